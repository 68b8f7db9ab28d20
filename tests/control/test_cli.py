"""The operator CLI, run as a subprocess against a gateway running as its own process, on SQLite and
PostgreSQL: servers, replicas and slot leases, orphans, the outbox, and drain during an open download."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import trio

from control.app import open_store
from control.config import Settings
from storage.clock import utcnow
from storage.edge import EdgeOutbox
from tests.conftest import TEST_SECRET
from tests.control.process import Api, GatewayProcess, agent_record, alive, process_env, sparse_file


@pytest.fixture
async def running(tmp_path: Path, database_url: str) -> AsyncIterator[GatewayProcess]:
    toml = tmp_path / "hypercorn.toml"
    toml.write_text('bind = ["127.0.0.1:0"]\ngraceful_timeout = 30\nkeep_alive_timeout = 5\n')
    gateway = GatewayProcess(tmp_path / "data", process_env(tmp_path / "data", database_url,
                                                             ZLH_HYPERCORN_CONFIG=str(toml)))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def api_for(gateway: GatewayProcess, client: httpx.AsyncClient) -> Api:
    api = Api(client)
    await api.register()
    return api


async def test_servers_lists_state_and_agent_freshness(running: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
        api = await api_for(running, client)
        instance = await api.provision("game", "listed")
    [row] = await running.cli("servers")
    assert (row["id"], row["vmid"], row["owner"], row["state"]) == (instance["id"], instance["vmid"],
                                                                    "op@example.com", "ready")
    assert row["alive"] and row["ready"] and row["fresh"] and row["lastSeenAt"]


async def test_replicas_shows_slot_leases_on_postgresql_and_none_on_sqlite(running: GatewayProcess,
                                                                          database_url: str) -> None:
    data = await running.cli("replicas")
    if database_url.startswith("sqlite"):
        assert data["replicas"] == []  # one process owns everything; nothing is leased
        return
    with trio.fail_after(20):
        while not data["replicas"] or len(data["replicas"][0]["slots"]) != 128:
            await trio.sleep(0.2)
            data = await running.cli("replicas")
    [replica] = data["replicas"]
    record = json.loads(next((running.data_dir / "run").glob("*.json")).read_text())
    assert replica["id"] == record["replicaId"] and replica["live"]
    assert data["leader"] == replica["id"] and data["unheldSlots"] == []


async def test_orphans_lists_containers_without_rows_and_rows_without_containers(running: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
        api = await api_for(running, client)
        kept = await api.provision("game", "kept")
        lost = await api.provision("dev", "lost")
    assert await running.cli("orphans") == {"containersWithoutRows": [], "rowsWithoutContainers": []}
    stray = running.data_dir / "containers" / "4242"
    stray.mkdir()
    (stray / "container.json").write_text(json.dumps({"vmid": 4242}))
    (running.data_dir / "containers" / str(lost["vmid"]) / "container.json").unlink()
    data = await running.cli("orphans")
    assert data["containersWithoutRows"] == [{"vmid": 4242}]
    assert [(r["vmid"], r["id"]) for r in data["rowsWithoutContainers"]] == [(lost["vmid"], lost["id"])]
    assert kept["vmid"] not in {r["vmid"] for r in data["rowsWithoutContainers"]}


async def in_database(url: str, data_dir: Path, work) -> None:  # type: ignore[no-untyped-def]
    """Run `work` on the gateway's database from this (test) process, through storage/ as the app does."""
    store = open_store(Settings.from_env(env={}, data_dir=data_dir, database_url=url, jwt_secret=TEST_SECRET))
    try:
        await store.run(work)
    finally:
        store.close()


async def test_outbox_lists_pending_and_failed_changes_and_retries_them(running: GatewayProcess,
                                                                        database_url: str) -> None:
    later = utcnow() + timedelta(hours=1)

    def enqueue() -> None:
        EdgeOutbox.create(target="dns", key="instance:901", action="publish", record={}, due_at=later)
        EdgeOutbox.create(target="velocity", key="velocity.toml", action="publish", record={}, attempts=3,
                          due_at=later, last_error="connection refused")

    await in_database(database_url, running.data_dir, enqueue)
    everything = await running.cli("outbox")
    assert [(c["target"], c["attempts"]) for c in everything] == [("dns", 0), ("velocity", 3)]
    [failed] = await running.cli("outbox", "--failed")
    assert failed["lastError"] == "connection refused"
    assert await running.cli("outbox", "--retry") == {"retried": 1}
    [retried] = await running.cli("outbox", "--failed")
    assert retried["dueAt"] < everything[0]["dueAt"]  # due now, not in an hour
    assert await running.cli("outbox", "--retry", "999999", expect=1) == {"retried": 0}


async def test_drain_during_an_open_download_lets_it_finish_and_exits_zero(running: GatewayProcess) -> None:
    size = 256 * 1024 * 1024
    async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
        api = await api_for(running, client)
        instance = await api.provision("game", "busy")
        files = running.data_dir / "containers" / str(instance["vmid"]) / "data" / "files"
        await trio.to_thread.run_sync(sparse_file, files / "world.bin", size)
        agent_pid = agent_record(running.data_dir, instance["vmid"])["pid"]
        url = f"/api/servers/{instance['id']}/files/download?path=world.bin"
        received = 0
        drained: dict = {}
        async with client.stream("GET", url, headers=api.headers) as response:
            assert response.status_code == 200
            chunks = response.aiter_raw(1024 * 1024)
            received += len(await chunks.__anext__())

            async def drain() -> None:
                drained.update(await running.cli("drain"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                with trio.fail_after(20):  # draining: the replica takes no new connection
                    while True:
                        try:
                            async with httpx.AsyncClient(timeout=2) as fresh:
                                await fresh.get(running.url + "/health")
                        except httpx.TransportError:
                            break
                        await trio.sleep(0.1)
                if not running.env["DATABASE_URL"].startswith("sqlite"):
                    # Its slots went to the rest of the fleet while the download is still open.
                    [replica] = (await running.cli("replicas"))["replicas"]
                    assert replica["draining"] and replica["slots"] == []
                async for chunk in chunks:
                    received += len(chunk)
    assert received == size
    assert drained["drained"] is True and drained["pid"] == running.process.pid  # type: ignore[union-attr]
    assert await running.wait_exit() == 0
    assert not list((running.data_dir / "run").glob("*.json"))
    with trio.fail_after(10):  # a clean shutdown stops the local agents too
        while alive(agent_pid):
            await trio.sleep(0.1)


async def test_drain_without_a_running_replica_says_so(tmp_path: Path, database_url: str) -> None:
    gateway = GatewayProcess(tmp_path / "data", process_env(tmp_path / "data", database_url))
    done = await trio.run_process([sys.executable, "-m", "control", "drain"], env=gateway.env, cwd=tmp_path,
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 1 and b"no such replica" in done.stderr
