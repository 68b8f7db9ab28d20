"""Who drives an operation in progress (storage/operations.py), driven directly on both databases:
only an orphan (its driver not live) is taken over by the periodic sweep; start-up also takes this
replica's own and undriven ones; a live replica's operation is never taken; of two replicas claiming
the same orphans at once each orphan goes to exactly one; with no cluster (no TTL) every operation in
progress is the caller's."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from storage import cluster as store_cluster
from storage import environments as store_env
from storage import operations as store_operations
from storage import users
from storage.db import Store, connect_database
from storage.instances import create_instance
from storage.migrations import migrate

TTL = 30.0
PROVISIONING = ["reserved", "creating", "configuring", "awaiting_ready", "publishing"]
ENVIRONMENT_IN_PROGRESS = ["CREATING", "STARTING", "STOPPING", "DELETING"]


@pytest.fixture
async def store(database_url: str) -> Store:
    db = connect_database(database_url)
    await trio.to_thread.run_sync(migrate, db)
    return Store(db, threads=4)


def seed(drivers: dict[str, tuple[str, str | None]]) -> dict[str, int]:
    """An instance per name, in (state, driven_by); live replicas "a" and "b"; their ids by name."""
    owner = users.create_user("ops@example.com", "x")
    for replica in ("a", "b"):
        store_cluster.heartbeat(replica, None, ttl=TTL, slot_count=4)
    return {name: create_instance(vmid=100 + i, owner=owner.id, kind="game", name=name, engine_type="minecraft",
                                  provider="local", state=state, driven_by=driver).id
            for i, (name, (state, driver)) in enumerate(drivers.items())}


async def claim(store: Store, replica: str, ttl: float | None, *, own_and_undriven: bool) -> list[int]:
    return await store.run(store_operations.claim_provisionings, PROVISIONING, replica, ttl,
                           own_and_undriven=own_and_undriven)


async def test_the_sweep_takes_only_orphans_and_start_up_also_its_own_and_undriven(store: Store) -> None:
    ids = await store.run(seed, {
        "live-a": ("creating", "a"), "orphan": ("configuring", "gone"), "undriven": ("reserved", None),
        "own": ("awaiting_ready", "b"), "finished": ("ready", "gone")})

    assert await claim(store, "b", TTL, own_and_undriven=False) == [ids["orphan"]]
    assert await claim(store, "b", TTL, own_and_undriven=False) == []  # it is b's now, and b is live
    assert sorted(await claim(store, "b", TTL, own_and_undriven=True)) == sorted(
        [ids["orphan"], ids["undriven"], ids["own"]])
    assert await claim(store, "a", TTL, own_and_undriven=True) == [ids["live-a"]]
    # One process (no TTL): every operation in progress is the caller's, whoever drove it.
    assert sorted(await claim(store, "solo", None, own_and_undriven=True)) == sorted(
        ids[n] for n in ("live-a", "orphan", "undriven", "own"))


async def test_an_orphan_goes_to_exactly_one_of_two_replicas_claiming_at_once(store: Store) -> None:
    ids = await store.run(seed, {f"orphan-{i}": ("creating", "gone") for i in range(20)})
    won: dict[str, list[int]] = {}

    async def sweep(replica: str) -> None:
        won[replica] = await claim(store, replica, TTL, own_and_undriven=False)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweep, "a")
        nursery.start_soon(sweep, "b")
    assert not set(won["a"]) & set(won["b"])
    assert sorted(won["a"] + won["b"]) == sorted(ids.values())


async def test_a_repeated_delete_is_driven_here_only_when_nobody_live_drives_it(store: Store) -> None:
    def environments() -> None:
        user = users.create_user("env@example.com", "x")
        for replica in ("a", "b"):
            store_cluster.heartbeat(replica, None, ttl=TTL, slot_count=4)
        for environment_id, driver in (("env-live", "a"), ("env-gone", "gone"), ("env-failed", None)):
            store_env.create_environment(
                id=environment_id, owner=user.id, instance_id=None, name=environment_id, cloud_provider="GCP",
                cloud_region="europe-west1", cpu_cores=2, memory_gb=4, storage_gb=20, base_image="node",
                status="DELETING", driven_by=driver)

    await store.run(environments)

    async def drive(environment_id: str, replica: str) -> bool:
        return await store.run(store_operations.claim_environment, environment_id, "DELETING", replica, TTL)

    assert not await drive("env-live", "b")
    assert await drive("env-live", "a")  # its own
    assert await drive("env-gone", "b") and await drive("env-failed", "b")
    assert not await store.run(store_operations.claim_environment, "env-live", "STOPPING", "a", TTL)

    def driven_by() -> dict[str, Any]:
        return {e.id: e.driven_by for e in store_env.Environment.select()}

    assert await store.run(driven_by) == {"env-live": "a", "env-gone": "b", "env-failed": "b"}
    assert [e.id for e in await store.run(store_operations.claim_environment_operations, ENVIRONMENT_IN_PROGRESS,
                                          "a", TTL, own_and_undriven=False)] == []
