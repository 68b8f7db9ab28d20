"""Provisioning through the real API with ZLH_PROVIDER=proxmox against the PVE-compatible test server,
on a node shared with another team: the gateway on a real socket, proxmoxer over HTTPS, a reference
agent started by the template's (emulated) pre-start hookscript with the secret from the description."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from bench.agent import AgentConfig, serve_agent
from control.config import Settings
from control.providers.proxmox import SECRET_LINE
from tests.conftest import TEST_SECRET, Gateway
from tests.proxmox.pve_server import Ct, FakePve, Rule

TEMPLATE = 9000
FIRST_VMID = 1000  # storage.instances.FIRST_VMID: the VMID our database proposes first


@pytest.fixture
def pve() -> Iterator[FakePve]:
    server = FakePve(task_seconds=0.03)
    server.start()
    server.add_template(TEMPLATE)
    server.eth0_address = "127.0.0.1/8"
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def agent_port() -> Iterator[int]:
    """A port for the agent, held (SO_REUSEADDR, not listening) until the agent binds it at pre-start."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


@pytest.fixture
def settings(database_url: str, tmp_path: Path, pve: FakePve, agent_port: int) -> Settings:
    return Settings.from_env(
        env={}, data_dir=tmp_path / "data", database_url=database_url, jwt_secret=TEST_SECRET,
        argon2_time_cost=1, argon2_memory_kib=64, argon2_parallelism=1,
        bind=["127.0.0.1:0"], hypercorn_config=Path(__file__).parent.parent.parent / "hypercorn.toml",
        poll_interval=0.5, ready_timeout=30.0, provider="proxmox", proxmox_url=pve.url,
        proxmox_token_id=pve.token_id, proxmox_token_secret=pve.token_secret, proxmox_node=pve.node,
        proxmox_ca_bundle=str(pve.cert_path), proxmox_template=str(TEMPLATE), proxmox_agent_port=agent_port,
        proxmox_address_timeout=1.0, proxmox_timeout=1.0)


@pytest.fixture
def hookscript(pve: FakePve, nursery: trio.Nursery, tmp_path: Path, agent_port: int) -> list[str]:
    """At a container's pre-start, hand the secret in its description to a reference agent."""
    token = trio.lowlevel.current_trio_token()
    secrets_seen: list[str] = []

    def prestart(ct: Ct) -> None:
        lines = str(ct.config.get("description", "")).splitlines()
        secret = next((line.split(":", 1)[1].strip() for line in lines if line.startswith(SECRET_LINE)), None)
        if secret is None or secrets_seen:
            return
        secrets_seen.append(secret)
        config = AgentConfig(data_dir=tmp_path / f"agent-{ct.vmid}", secret=secret, port=agent_port)
        trio.from_thread.run(nursery.start, partial(serve_agent, config), trio_token=token)

    pve.prestart = prestart
    return secrets_seen


async def test_foreign_vmid_is_skipped_and_a_start_with_warnings_provisions_to_ready(
        pve: FakePve, hookscript: list[str], gateway: Gateway) -> None:
    pve.add_container(FIRST_VMID, "other-team-db", status="running")
    pve.inject(Rule("POST", r"/nodes/pve/lxc/\d+/status/start", "task_warning",
                    message="Systemd 232 detected. You may need to enable nesting."))
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "survival")
    server = (await gateway.client.get(f"/api/servers/{instance['id']}", headers=gateway.bearer(session))).json()
    assert server["vmid"] == FIRST_VMID + 1 and server["instanceState"] == "ready"
    ct = pve.containers[FIRST_VMID + 1]
    assert ct.status == "running" and SECRET_LINE not in ct.config["description"]
    assert len(hookscript) == 1
    # The other team's container was looked at, never stopped, reconfigured or destroyed.
    assert pve.mutations_of(FIRST_VMID) == []
    assert pve.containers[FIRST_VMID].status == "running"
    # Deleting it by VMID is not possible for a user, nor is it listed as an orphan of ours.
    refused = await gateway.client.delete(f"/api/containers/{FIRST_VMID}", headers=gateway.bearer(session))
    assert refused.status_code == 404
    assert pve.mutations_of(FIRST_VMID) == []


async def test_dhcp_that_never_answers_fails_the_provisioning_and_removes_the_container(
        pve: FakePve, gateway: Gateway) -> None:
    pve.dhcp_answers = False
    session = await gateway.register()
    response = await gateway.client.post("/api/instances", headers=gateway.bearer(session), json={
        "kind": "game", "name": "nodhcp", "engineType": "minecraft", "payload": {}})
    assert response.status_code == 202, response.text
    sid = response.json()["id"]
    server = await gateway.wait_for(lambda b: b.get("instanceState") == "failed", f"/api/servers/{sid}", session)
    assert "DHCP never answered" in server["stateReason"]
    assert "cleanup failed" not in server["stateReason"]
    assert server["vmid"] not in pve.containers
    assert ("DELETE", f"/nodes/pve/lxc/{server['vmid']}") in pve.mutations_of(server["vmid"])


async def test_delete_is_refused_when_another_container_now_holds_our_vmid(
        pve: FakePve, hookscript: list[str], gateway: Gateway) -> None:
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "survival")
    vmid = instance["vmid"]
    pve.add_container(vmid, "someone-elses", status="running")  # ours removed by hand, the VMID reused
    before = len(pve.mutations_of(vmid))
    refused = await gateway.client.delete(f"/api/containers/{vmid}", headers=gateway.bearer(session))
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "CONTAINER_NOT_OURS"
    assert "no ZLH ownership marker" in refused.json()["details"]["reason"]
    assert pve.mutations_of(vmid)[before:] == []
    server = (await gateway.client.get(f"/api/servers/{instance['id']}", headers=gateway.bearer(session))).json()
    assert "refused to destroy" in server["stateReason"]


async def test_a_clone_answered_after_the_timeout_is_adopted_and_provisions_to_ready(
        pve: FakePve, hookscript: list[str], gateway: Gateway) -> None:
    # PVE sat on the clone past our 1 s call timeout (a config lock), then carried it out.
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone", "delay", seconds=1.6))
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "late")
    assert pve.created == [instance["vmid"]] and len(pve.calls("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone")) == 1
    assert pve.containers[instance["vmid"]].status == "running"


async def test_a_late_clone_of_a_provisioning_that_then_fails_is_removed(pve: FakePve, gateway: Gateway) -> None:
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone", "delay", seconds=1.6))
    pve.dhcp_answers = False
    session = await gateway.register()
    response = await gateway.client.post("/api/instances", headers=gateway.bearer(session), json={
        "kind": "game", "name": "late-and-failed", "engineType": "minecraft", "payload": {}})
    sid = response.json()["id"]
    server = await gateway.wait_for(lambda b: b.get("instanceState") == "failed", f"/api/servers/{sid}", session)
    assert "DHCP never answered" in server["stateReason"]
    assert pve.created == [server["vmid"]] and pve.containers.keys() == {TEMPLATE}  # nothing of ours left
