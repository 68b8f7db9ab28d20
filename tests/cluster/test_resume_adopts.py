"""A takeover in the middle of a provisioning, on real replica processes with the local provider and a
data directory each (as separate machines): the driving replica is killed with SIGKILL right after
it spawned the agent, before it could record the agent's address. The survivor resumes `creating`,
finds the container the database names and adopts it — one agent, never a second — and when the
killed replica starts again it neither starts a third nor overwrites the server's agent address from
its own local record: a file written in between is readable through both replicas. A third replica,
which never held the container, deletes it for good: agent and directory."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from control.providers.local import _processes_in
from storage import instances as store_instances
from tests.cluster.helpers import bearer, cluster, register, storage, wait_until
from tests.conftest import DATABASES

# Real replica processes killed and restarted: run by `make e2e` (CI runs it after `make test`).
pytestmark = [pytest.mark.skipif("postgresql" not in DATABASES, reason="scale-out runs on PostgreSQL only"),
              pytest.mark.e2e]


def agents_under(root: Path) -> set[int]:
    """Pids of agent processes working in any container directory under `root`."""
    found: set[int] = set()
    for directory in root.glob("data-*/containers/*"):
        if directory.is_dir() and not directory.is_symlink():
            found.update(_processes_in(directory))
    return found


def row(instance_id: int) -> dict[str, Any]:
    instance = store_instances.get_instance(instance_id)
    assert instance is not None
    return {"state": instance.state, "ref": instance.provider_ref, "port": instance.agent_port,
            "driver": instance.driven_by}


async def test_a_takeover_mid_create_adopts_the_container_and_a_restart_keeps_the_recorded_agent(
        pg_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = pg_cluster.fresh_database()
    try:
        async with cluster(url, tmp_path, ZLH_PROVIDER="local") as replicas, \
                httpx.AsyncClient(timeout=15) as http:
            r1, r2 = await replicas.start("r1", "r2")
            session = await register(http, r1.url, "maker@example.com")
            created = await http.post(f"{r1.url}/api/instances", headers=bearer(session), json={
                "kind": "game", "name": "adopted", "engineType": "minecraft", "payload": {}})
            assert created.status_code == 202, created.text
            instance_id = created.json()["id"]
            vmid = created.json()["vmid"]

            # kill -9 r1 the moment its agent is spawned (its pid recorded, its port not yet)
            record_path = replicas.data_dir("r1") / "containers" / str(vmid) / "container.json"

            def spawned() -> bool:
                try:
                    return bool(json.loads(record_path.read_text()).get("pid"))
                except (OSError, ValueError):
                    return False

            await wait_until(spawned, 30, step=0.005)
            r1.kill()
            at_kill = await storage(url, row, instance_id)
            assert at_kill["state"] == "creating" and at_kill["port"] is None, at_kill  # inside the window
            assert at_kill["ref"] == str(record_path.parent), at_kill  # the identity was recorded first

            async def ready_via(replica_url: str) -> bool:
                body = (await http.get(f"{replica_url}/api/servers/{instance_id}", headers=bearer(session))).json()
                return body.get("instanceState") == "ready" and body.get("agentReady") is True

            await wait_until(lambda: ready_via(r2.url), 60)
            taken = await storage(url, row, instance_id)
            assert taken["driver"] == "r2" and taken["ref"] == at_kill["ref"], taken  # adopted, not remade
            assert len(agents_under(tmp_path)) == 1, agents_under(tmp_path)
            assert not (replicas.data_dir("r2") / "containers" / str(vmid) / "data").exists() or \
                (replicas.data_dir("r2") / "containers" / str(vmid)).is_symlink()

            upload = await http.put(f"{r2.url}/api/servers/{instance_id}/files/upload?path=notes.txt",
                                    headers=bearer(session), content=b"written during the takeover")
            assert upload.status_code == 201, upload.text

            [r1] = await replicas.start("r1")  # the killed replica comes back
            await trio.sleep(3)  # its start-up (provider re-adoption, address refresh) and a few polls
            assert await storage(url, row, instance_id) == taken  # its local record changed nothing
            assert len(agents_under(tmp_path)) == 1, agents_under(tmp_path)
            for replica in (r1, r2):
                assert await ready_via(replica.url)
                download = await http.get(f"{replica.url}/api/game/servers/{instance_id}/files/download"
                                          "?path=notes.txt", headers=bearer(session))
                assert download.status_code == 200, (replica.name, download.text)
                assert download.content == b"written during the takeover"

            # A replica that never saw the container deletes it: the database names it, so it goes.
            [r3] = await replicas.start("r3")
            deleted = await http.delete(f"{r3.url}/api/containers/{vmid}", headers=bearer(session))
            assert deleted.status_code == 200, deleted.text
            assert agents_under(tmp_path) == set()
            assert not record_path.parent.exists()
    finally:
        for pid in agents_under(tmp_path):  # agents outlive their gateway, as containers do
            os.killpg(pid, signal.SIGKILL)
