"""Replicas started at the same instant on an empty database, as an orchestrator starts them: every
one migrates-or-waits and seeds the plans under the migrations' advisory lock, so none crashes (it
used to: `duplicate key … "plan_pkey"` from a check-then-insert outside the lock), and their first
slot claims, all at once from one pool, never deadlock (PostgreSQL's log). Ten fresh databases, three
real replica processes each, each with its own data directory."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from control.config import DEFAULT_PLANS
from storage.models import Plan
from tests.cluster.helpers import cluster, storage
from tests.conftest import DATABASES

# Real replica processes killed and restarted: run by `make e2e` (CI runs it after `make test`).
pytestmark = [pytest.mark.skipif("postgresql" not in DATABASES, reason="scale-out runs on PostgreSQL only"),
              pytest.mark.e2e]

RUNS = 10
REPLICAS = ("r1", "r2", "r3")


def plan_names() -> list[str]:
    return sorted(p.name for p in Plan.select(Plan.name))


async def test_three_replicas_started_together_on_an_empty_database_all_serve(
        pg_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log_offset = pg_cluster.log_size()
    async with httpx.AsyncClient(timeout=10) as http:
        for run in range(RUNS):
            url = pg_cluster.empty_database()
            workdir = tmp_path / f"run-{run}"
            workdir.mkdir()
            async with cluster(url, workdir) as replicas:
                started = await replicas.start(*REPLICAS, together=True)
                assert len(started) == len(REPLICAS)
                for replica in started:
                    response = await http.get(f"{replica.url}/health")
                    assert response.status_code == 200, (run, replica.name, response.text)
                    assert replica.child.process.poll() is None, replica.child.tail()
                for replica in started:  # no cleanup to wait for: the next run has its own database
                    replica.kill()
                with trio.fail_after(10):
                    for replica in started:
                        await replica.child.process.wait()
            assert await storage(url, plan_names) == sorted(p["name"] for p in DEFAULT_PLANS)
    # they also claimed their slots from one empty pool at the same instant
    logged = pg_cluster.log_since(log_offset)
    assert "deadlock detected" not in logged, logged
