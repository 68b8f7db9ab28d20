"""The poller's batched write of agent state (storage/instances.record_polls): one statement for the
whole batch on both databases, and whatever an agent did not report keeps its last value."""

from __future__ import annotations

from datetime import timedelta

import pytest
import trio

from storage import instances as store_instances
from storage import users as store_users
from storage.clock import utcnow
from storage.db import Store, connect_database
from storage.instances import PollResult
from storage.migrations import migrate


@pytest.fixture
async def store(database_url: str) -> Store:
    db = connect_database(database_url)
    await trio.to_thread.run_sync(migrate, db)
    return Store(db, threads=2)


def _two_servers() -> list[int]:
    owner = store_users.create_user("poll@example.com", "x")
    ids = []
    for offset in range(2):
        instance = store_instances.create_instance(
            vmid=7000 + offset, owner=owner, kind="game", name=f"poll-{offset}", engine_type="minecraft",
            payload={}, allocated_ports=[], provider="local", agent_host="127.0.0.1", agent_port=1,
            agent_secret="s", state="ready")
        ids.append(int(instance.get_id()))
    return ids


def _agent(instance_id: int) -> object:
    ((_instance, agent),) = store_instances.server_rows(None, instance_id)
    return agent


async def test_a_batch_writes_every_result_and_keeps_what_was_not_reported(store: Store) -> None:
    first, second = await store.run(_two_servers)
    at = utcnow().replace(microsecond=250000)
    status = {"state": "running", "players": ["ann"], "operations": [{"kind": "backup"}],
              "resources": {"cpu": 0.5}, "version": "1.20.1", "updateAvailable": False}
    await store.run(store_instances.record_polls, [
        PollResult(first, alive=True, ready=True, checked_at=at, status=status,
                   details={"players": ["ann", "bob"], "updateAvailable": True}),
        PollResult(second, alive=False, ready=False, checked_at=at, error="/ready: timeout"),
    ])
    agent = await store.read(_agent, first)
    assert (agent.alive, agent.ready, agent.server_state, agent.last_error) == (True, True, "running", None)
    assert agent.players == ["ann", "bob"]  # the slow cadence's /players wins over /status
    assert (agent.operations, agent.resources, agent.version) == ([{"kind": "backup"}], {"cpu": 0.5}, "1.20.1")
    assert agent.update_available is True
    assert agent.polled_at == agent.last_seen_at == agent.ready_checked_at == at
    down = await store.read(_agent, second)
    assert (down.alive, down.ready, down.last_error, down.last_seen_at) == (False, False, "/ready: timeout", None)

    # A later poll without /status (the agent stopped answering) keeps the snapshot and counts failures.
    later = at + timedelta(seconds=5)
    for _ in range(2):
        await store.run(store_instances.record_polls, [
            PollResult(first, alive=False, ready=False, checked_at=later, error="/health: HTTP 503")])
    agent = await store.read(_agent, first)
    assert (agent.alive, agent.ready, agent.polled_at, agent.last_seen_at) == (False, False, later, at)
    assert (agent.server_state, agent.players, agent.version, agent.update_available) == (
        "running", ["ann", "bob"], "1.20.1", True)
    failures = await store.read(lambda: store_instances.AgentState.get_by_id(first).failures)
    assert failures == 2

    # Back: failures reset; a /status without optional fields clears resources and keeps the version.
    await store.run(store_instances.record_polls, [
        PollResult(first, alive=True, ready=False, checked_at=later, status={"state": "stopped"})])
    agent = await store.read(_agent, first)
    assert (agent.alive, agent.server_state, agent.players, agent.operations) == (True, "stopped", [], [])
    assert (agent.resources, agent.version) == (None, "1.20.1")
    assert await store.read(lambda: store_instances.AgentState.get_by_id(first).failures) == 0


async def test_freshness_and_targets_per_slot_are_read_in_the_database(store: Store) -> None:
    from storage import cluster as store_cluster

    first, second = await store.run(_two_servers)
    now = utcnow()
    never = await store.read(store_instances.poll_freshness, now)
    assert (never.oldest, sorted(never.late), never.never, never.dead) == (None, [first, second], 2, 0)
    await store.run(store_instances.record_polls, [
        PollResult(first, alive=True, ready=True, checked_at=now - timedelta(seconds=9)),
        PollResult(second, alive=False, ready=False, checked_at=now, error="/ready: timeout")])
    seen = await store.read(store_instances.poll_freshness, now - timedelta(seconds=7))
    assert (seen.oldest, sorted(seen.late), seen.never, seen.dead) == (
        now - timedelta(seconds=9), [first, second], 0, 1)  # one too old, one not alive

    targets = await store.read(store_instances.poll_targets)
    assert [t.instance_id for t in targets] == [first, second]
    by_slot = await store.read(store_cluster.poll_targets_in_slots, {first % 2}, 2)
    assert [t.instance_id for t in by_slot] == [first]
    assert await store.read(store_cluster.poll_targets_in_slots, set(), 2) == []
