"""The lease rules of storage/cluster.py, driven directly (no processes): fair shares over the live
replicas, a hand-over that waits for the lease its last holder promised, one fleet leader, and a
graceful exit that frees everything at once. Plus: SQLite (one process) runs no cluster at all."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import trio

from control.cluster import cluster_enabled
from control.config import Settings
from storage import cluster as store_cluster
from storage.db import Store, connect_database
from tests.cluster.helpers import wait_until
from tests.conftest import DATABASES, TEST_SECRET

SLOTS = 16
TTL = 0.6


@pytest.fixture
async def store(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    if "postgresql" not in DATABASES:
        pytest.skip("scale-out runs on PostgreSQL only")
    url = request.getfixturevalue("pg_cluster").fresh_database()
    store = Store(connect_database(url, max_connections=4), threads=2)
    yield store
    store.close()


async def beat(store: Store, replica: str) -> store_cluster.ClusterView:
    return await store.run(store_cluster.heartbeat, replica, None, ttl=TTL, slot_count=SLOTS)


def test_fair_shares_add_up_to_every_slot() -> None:
    live = ["a", "b", "c"]
    assert [store_cluster.fair_share(r, live, SLOTS) for r in live] == [6, 5, 5]
    assert store_cluster.fair_share("gone", live, SLOTS) == 0


async def test_slots_are_split_handed_over_after_expiry_and_freed_on_resign(store: Store) -> None:
    one = await beat(store, "r1")
    assert one.slots == frozenset(range(SLOTS)) and one.leader
    two = await beat(store, "r2")
    assert two.slots == frozenset() and not two.leader  # nothing lapsed yet: r2 waits
    one = await beat(store, "r1")  # r1 sees two live replicas and gives back half, keeping their expiry
    assert len(one.slots) == SLOTS // 2
    assert (await beat(store, "r2")).slots == frozenset()  # still promised to r1 until the expiry

    async def r2_has_its_share() -> bool:
        await beat(store, "r1")
        return len((await beat(store, "r2")).slots) == SLOTS // 2

    await wait_until(r2_has_its_share, 5, step=0.1)
    holders = await store.run(store_cluster.slot_holders)
    assert Counter(holders.values()) == Counter({"r1": 8, "r2": 8})
    assert await store.run(store_cluster.lease_holder) == "r1"

    await store.run(store_cluster.resign, "r1")
    taken = await beat(store, "r2")
    assert taken.slots == frozenset(range(SLOTS)) and taken.leader and taken.live == ["r2"]


async def test_a_silent_replica_loses_its_slots_and_leadership_after_the_ttl(store: Store) -> None:
    await beat(store, "r1")
    await beat(store, "r2")
    started = trio.current_time()

    async def r2_took_everything() -> bool:
        view = await beat(store, "r2")  # r1 never beats again (killed)
        return view.slots == frozenset(range(SLOTS)) and view.leader

    await wait_until(r2_took_everything, 5, step=0.05)
    assert trio.current_time() - started >= TTL * 0.9


def test_sqlite_runs_no_cluster_postgresql_does(tmp_path: Path) -> None:
    sqlite = Settings.from_env(env={}, data_dir=tmp_path, jwt_secret=TEST_SECRET)
    store = Store(connect_database(sqlite.database_url))
    assert not cluster_enabled(sqlite, store)
    postgres = Settings.from_env(env={}, data_dir=tmp_path, jwt_secret=TEST_SECRET,
                                 database_url="postgresql://nobody@/none?host=/nonexistent")
    assert cluster_enabled(postgres, Store(connect_database(postgres.database_url)))
    postgres.cluster = "off"
    assert not cluster_enabled(postgres, Store(connect_database(postgres.database_url)))
