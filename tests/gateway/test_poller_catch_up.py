"""Agents handed to a partitioned poller in the middle of a round (a dead replica's, taken over) are
polled within the catch-up spread, alongside the round, not after it ends — a round spreads its polls
over most of a 5 s interval, which pushed takeovers to 8.6–9.6 s; and agents the round already knows
are never polled twice by the catch-up. Real simulated agents on real sockets."""

from __future__ import annotations

import trio

from bench.agent.config import FleetConfig
from bench.agent.simulator import serve_fleet
from gateway.agent_client import AgentClient
from gateway.agent_http import SmallCallPool
from gateway.metrics import Metrics
from gateway.poller import Poller
from storage import instances as store_instances
from storage.db import Store, connect_database
from storage.instances import PollResult, PollTarget
from storage.migrations import migrate
from storage.models import User

KNOWN, GAINED = 6, 4
INTERVAL = 10.0  # a round spreads over 8 s


class RecordingPoller(Poller):
    polled: list[tuple[int, float]]

    async def poll_agent(self, target: PollTarget, slow: bool = False) -> PollResult:
        self.polled.append((target.instance_id, trio.current_time()))
        return await super().poll_agent(target, slow)


def make_rows(ports: list[int], secrets: list[str]) -> list[PollTarget]:
    owner = User.create(email="poller@example.com", password_hash="x")
    targets = []
    for i, (port, secret) in enumerate(zip(ports, secrets, strict=True)):
        instance = store_instances.create_instance(
            vmid=7000 + i, owner=owner.id, kind="game", name=f"sim-{i}", engine_type="sim", provider="sim",
            agent_host="127.0.0.1", agent_port=port, agent_secret=secret, state="ready")
        targets.append(PollTarget(instance.id, "127.0.0.1", port, secret))
    return targets


async def test_agents_gained_mid_round_are_polled_within_the_catch_up_not_after_the_round(
        database_url: str, nursery: trio.Nursery) -> None:
    db = connect_database(database_url)
    await trio.to_thread.run_sync(migrate, db)
    store = Store(db, threads=2)
    fleet = await nursery.start(serve_fleet, FleetConfig(count=KNOWN + GAINED, ports_each=True, start_seconds=0.0))
    targets = await store.run(make_rows, list(fleet.ports), [fleet.secret(i) for i in range(KNOWN + GAINED)])
    held = targets[:KNOWN]

    async def list_targets() -> list[PollTarget]:
        return list(held)

    client = AgentClient(SmallCallPool(connect_timeout=2), timeout=2)
    poller = RecordingPoller(store, client, Metrics(), interval=INTERVAL, list_targets=list_targets)
    poller.polled = []
    await nursery.start(poller.run)
    with trio.fail_after(INTERVAL):
        while len(poller.polled) < 2:  # the round is under way, most of its agents still to come
            await trio.sleep(0.01)
    gained_at = trio.current_time()
    held.extend(targets[KNOWN:])
    poller.targets_grew()
    gained = {t.instance_id for t in targets[KNOWN:]}
    with trio.fail_after(poller.catch_up_spread + 1.0):
        while not gained <= {i for i, _ in poller.polled}:
            await trio.sleep(0.01)
    assert trio.current_time() - gained_at <= poller.catch_up_spread + 1.0
    round_started = poller.polled[0][1]
    await trio.sleep_until(round_started + INTERVAL * 0.85)  # the round's polls are done (spread: 0.8)
    # every agent polled once in this round: none twice (the catch-up leaves the round's own agents alone)
    counts = {t.instance_id: sum(1 for i, _ in poller.polled if i == t.instance_id) for t in targets}
    assert all(count == 1 for count in counts.values()), counts
    nursery.cancel_scope.cancel()
    store.close()
