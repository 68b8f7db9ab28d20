"""Slot claims under contention, on real PostgreSQL: replicas whose heartbeats run at the same
instant (their transactions held open together by a barrier) after a holder died never deadlock —
PostgreSQL's log says no "deadlock detected" — and reach the fair split in that one heartbeat. And
`next_lapse` tells a survivor when the dead holder's leases become claimable."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest
import trio

from storage import cluster as store_cluster
from storage.db import Store, connect_database
from tests.conftest import DATABASES

# Real replica processes killed and restarted: run by `make e2e` (CI runs it after `make test`).
pytestmark = [pytest.mark.skipif("postgresql" not in DATABASES, reason="scale-out runs on PostgreSQL only"),
              pytest.mark.e2e]

SLOTS = 128
TTL = 1.5
SURVIVORS = ["a", "b", "c"]
ROUNDS = 8


async def test_three_replicas_claiming_at_once_never_deadlock_and_split_fairly_in_one_heartbeat(
        pg_cluster) -> None:  # type: ignore[no-untyped-def]
    url = pg_cluster.fresh_database()
    store = Store(connect_database(url, max_connections=8), threads=len(SURVIVORS))
    log_offset = pg_cluster.log_size()
    try:
        for round_ in range(ROUNDS):
            dead = f"dead-{round_}"
            for name in SURVIVORS:
                await store.run(store_cluster.resign, name)
            grabbed = await store.run(store_cluster.heartbeat, dead, None, ttl=TTL, slot_count=SLOTS)
            assert grabbed.slots == frozenset(range(SLOTS))  # alone: it holds every slot, then dies
            lapse = trio.current_time() + TTL
            await trio.sleep(TTL / 2)
            for name in SURVIVORS:  # registered, live; nothing lapsed yet, so nothing to claim
                view = await store.run(store_cluster.heartbeat, name, None, ttl=TTL, slot_count=SLOTS)
                assert view.slots == frozenset()
                assert view.next_lapse is not None
                assert timedelta(0) < view.next_lapse - view.now <= timedelta(seconds=TTL)
            await trio.sleep_until(lapse + 0.1)

            barrier = threading.Barrier(len(SURVIVORS), timeout=10)

            def together(name: str, barrier: threading.Barrier = barrier) -> store_cluster.ClusterView:
                store_cluster.database_now()  # the transaction has begun
                barrier.wait()
                return store_cluster.heartbeat(name, None, ttl=TTL, slot_count=SLOTS)

            views: dict[str, store_cluster.ClusterView] = {}

            async def one(name: str, views: dict[str, store_cluster.ClusterView] = views) -> None:
                views[name] = await store.run(together, name)

            async with trio.open_nursery() as nursery:
                for name in SURVIVORS:
                    nursery.start_soon(one, name)

            for name, view in views.items():
                assert view.live == SURVIVORS, (round_, view.live)
                assert len(view.slots) == store_cluster.fair_share(name, SURVIVORS, SLOTS), (round_, name)
            held = [slot for view in views.values() for slot in view.slots]
            assert sorted(held) == list(range(SLOTS))  # every slot once
            holders = await store.run(store_cluster.slot_holders)
            assert Counter(holders.values()) == Counter({n: len(v.slots) for n, v in views.items()})
            assert sum(view.leader for view in views.values()) == 1
    finally:
        store.close()
    logged = pg_cluster.log_since(log_offset)
    assert "deadlock detected" not in logged, logged
