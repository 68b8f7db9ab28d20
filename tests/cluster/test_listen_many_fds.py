"""The cross-replica LISTEN connection in a process holding more than 1,024 descriptors (a replica
polling thousands of agents): Trio waits on the connection's socket itself, so a NOTIFY still arrives
(`select()` fails on descriptors above 1,024, and suspensions and revocations stopped reaching the
replica); and when PostgreSQL drops the connection it is re-opened and events flow again."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from control.cluster import FleetEvents
from storage.db import Store, connect_database
from tests.cluster.helpers import wait_until
from tests.conftest import DATABASES

pytestmark = pytest.mark.skipif("postgresql" not in DATABASES, reason="scale-out runs on PostgreSQL only")

PIPES = 600  # 1,200 descriptors


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if wanted < 2 * PIPES + 256:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    pipes = [os.pipe() for _ in range(PIPES)]
    try:
        probe = os.open(os.devnull, os.O_RDONLY)
        os.close(probe)
        assert probe > 1024, probe  # every descriptor opened from now on is above select()'s limit
        yield
    finally:
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_notify_arrives_on_a_listener_above_descriptor_1024_and_after_a_dropped_connection(
        pg_cluster, many_descriptors: None) -> None:  # type: ignore[no-untyped-def]
    url = pg_cluster.fresh_database()
    store = Store(connect_database(url, max_connections=4), threads=2)
    here = FleetEvents(store, "here", listen=True)
    there = FleetEvents(store, "there", listen=True)  # another replica, publishing only
    received: list[dict[str, Any]] = []
    here.on("console.disconnect_user", received.append)
    admin = pg_cluster.connect(store.db.database)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(here.run)
            await wait_until(lambda: here.listening, 10, step=0.02)
            await there.publish("console.disconnect_user", user=7)
            await wait_until(lambda: len(received) == 1, 5, step=0.02)
            assert received[0]["user"] == 7 and received[0]["origin"] == "there"

            cursor = admin.cursor()  # PostgreSQL drops the LISTEN connection (a restart, a failover)
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND query LIKE 'LISTEN%'")
            assert cursor.fetchall() == [(True,)]
            await wait_until(lambda: not here.listening, 5, step=0.02)
            await wait_until(lambda: here.listening, 10, step=0.02)
            await there.publish("console.disconnect_user", user=8)
            await wait_until(lambda: len(received) == 2, 5, step=0.02)
            assert received[1]["user"] == 8
            nursery.cancel_scope.cancel()
    finally:
        admin.close()
        store.close()
