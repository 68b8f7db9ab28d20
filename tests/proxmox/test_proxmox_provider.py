"""The Proxmox provider driven through proxmoxer against the PVE-compatible HTTPS test server:
provisioning, power actions, destroy, task failures, lock retries, VMID reservation, idempotency."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from control.config import Settings
from control.providers.base import ContainerSpec, ProviderError
from control.providers.proxmox import SECRET_LINE, ProxmoxProvider
from storage.db import Store, connect_database
from storage.migrations import migrate
from tests.conftest import TEST_SECRET
from tests.proxmox.pve_server import FakePve, Rule

TEMPLATE = 9000


@pytest.fixture
def pve() -> Iterator[FakePve]:
    server = FakePve(task_seconds=0.03)
    server.start()
    server.add_template(TEMPLATE)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    db = connect_database(database_url)
    store = Store(db, threads=4)
    await trio.to_thread.run_sync(migrate, db)
    yield store
    store.close()


def pve_settings(pve: FakePve, tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path / "data", "jwt_secret": TEST_SECRET, "proxmox_url": pve.url,
        "proxmox_token_id": pve.token_id, "proxmox_token_secret": pve.token_secret, "proxmox_node": pve.node,
        "proxmox_ca_bundle": str(pve.cert_path), "proxmox_template": str(TEMPLATE), "proxmox_timeout": 2.0,
        "proxmox_task_timeout": 10.0}
    values.update(overrides)
    return Settings.from_env(env={}, **values)


def make_provider(pve: FakePve, store: Store, tmp_path: Path, **overrides: object) -> ProxmoxProvider:
    return ProxmoxProvider(pve_settings(pve, tmp_path, **overrides), store, backoff=0.02, max_backoff=0.1,
                           poll_interval=0.02, address_timeout=5)


@pytest.fixture
def provider(pve: FakePve, store: Store, tmp_path: Path) -> ProxmoxProvider:
    return make_provider(pve, store, tmp_path)


def spec_for(vmid: int, kind: str = "game", secret: str = "agent-secret-" + "x" * 32) -> ContainerSpec:
    return ContainerSpec(vmid=vmid, kind=kind, name=f"server {vmid}", hostname=f"{kind}-{vmid}",
                         engine_type="paper", cores=2, memory_mb=2048, disk_gb=16, agent_secret=secret)


async def test_provision_clones_template_sets_bootstrap_secret_and_starts(pve: FakePve,
                                                                         provider: ProxmoxProvider) -> None:
    vmid = await provider.reserve_vmid("request-1")
    container = await provider.create(spec_for(vmid, kind="dev", secret="s" * 40))
    ct = pve.containers[vmid]
    assert ct.status == "running" and ct.lock is None
    assert ct.config["hostname"] == f"dev-{vmid}"
    assert (ct.config["cores"], ct.config["memory"]) == ("2", "2048")
    assert f"{SECRET_LINE} {'s' * 40}" in ct.config["description"]
    assert set(ct.config["tags"].split(";")) == {"zlh", "zlh-dev"}
    assert "size=16G" in ct.config.get("rootfs", "size=16G")
    clone = pve.calls("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone")
    assert clone and clone[0]["newid"] == str(vmid) and clone[0]["full"] == "1"
    assert container.agent_host == f"10.10.0.{vmid % 256}"
    assert container.agent_port == provider.settings.proxmox_agent_port
    assert container.ide_port == provider.settings.proxmox_ide_port
    assert await provider.status(vmid) == "running"
    # The secret was set before the first start.
    order = [(m, p) for m, p, _ in pve.requests if p.startswith(f"/nodes/pve/lxc/{vmid}/")]
    assert order.index(("PUT", f"/nodes/pve/lxc/{vmid}/config")) < order.index(
        ("POST", f"/nodes/pve/lxc/{vmid}/status/start"))


async def test_provision_from_an_ostemplate_posts_to_the_node(pve: FakePve, store: Store, tmp_path: Path) -> None:
    provider = make_provider(pve, store, tmp_path, proxmox_template="local:vztmpl/debian-12.tar.zst",
                             proxmox_pool="zlh-games")
    vmid = await provider.reserve_vmid("request-os")
    container = await provider.create(spec_for(vmid))
    created = pve.calls("POST", "/nodes/pve/lxc")
    assert len(created) == 1
    assert created[0]["ostemplate"] == "local:vztmpl/debian-12.tar.zst"
    assert created[0]["rootfs"] == "local-lvm:16" and created[0]["pool"] == "zlh-games"
    assert container.ide_port is None and pve.containers[vmid].status == "running"


async def test_stop_then_start_and_repeats_are_no_ops(pve: FakePve, provider: ProxmoxProvider) -> None:
    vmid = await provider.reserve_vmid("request-power")
    await provider.create(spec_for(vmid))
    await provider.stop(vmid)
    assert await provider.status(vmid) == "stopped"
    await provider.stop(vmid)
    await provider.start(vmid)
    await provider.start(vmid)
    assert await provider.status(vmid) == "running"
    assert len(pve.calls("POST", rf"/nodes/pve/lxc/{vmid}/status/start")) == 2  # create's start + one


async def test_destroy_stops_then_purges_and_a_gone_container_counts_as_destroyed(
        pve: FakePve, provider: ProxmoxProvider) -> None:
    vmid = await provider.reserve_vmid("request-destroy")
    await provider.create(spec_for(vmid))
    await provider.destroy(vmid)
    assert vmid not in pve.containers
    assert await provider.status(vmid) == "missing"
    paths = [(m, p) for m, p, _ in pve.requests if p == f"/nodes/pve/lxc/{vmid}/status/stop" or m == "DELETE"]
    assert paths == [("POST", f"/nodes/pve/lxc/{vmid}/status/stop"), ("DELETE", f"/nodes/pve/lxc/{vmid}")]
    delete = pve.calls("DELETE", rf"/nodes/pve/lxc/{vmid}")[0]
    assert delete["purge"] == "1" and delete["destroy-unreferenced-disks"] == "1"
    await provider.destroy(vmid)  # already gone
    await provider.destroy(4242)  # never existed
    # The VMID went back to the pool: a new request may get it again.
    assert await provider.reserve_vmid("request-after") == vmid


async def test_failed_task_raises_provider_error_with_the_task_log(pve: FakePve, provider: ProxmoxProvider) -> None:
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone", "task_error",
                    message="clone failed: storage 'local-lvm' is out of space"))
    vmid = await provider.reserve_vmid("request-fail")
    with pytest.raises(ProviderError) as failure:
        await provider.create(spec_for(vmid))
    text = str(failure.value)
    assert "clone failed: storage 'local-lvm' is out of space" in text and "task log" in text
    assert f"starting task vzclone for {vmid}" in text
    assert vmid not in pve.containers


async def test_locked_container_is_retried_with_backoff(pve: FakePve, provider: ProxmoxProvider) -> None:
    vmid = await provider.reserve_vmid("request-locked")
    pve.inject(Rule("PUT", rf"/nodes/pve/lxc/{vmid}/config", "locked", times=2,
                    message=f"CT {vmid} is locked (backup)"))
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone", "task_error",
                    message=f"can't lock file '/run/lock/lxc/pve-config-{TEMPLATE}.lock' - got timeout"))
    started = trio.current_time()
    await provider.create(spec_for(vmid))
    assert pve.containers[vmid].status == "running"
    assert len(pve.calls("PUT", rf"/nodes/pve/lxc/{vmid}/config")) == 3
    assert len(pve.calls("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone")) == 2
    assert trio.current_time() - started >= 0.02 + 0.04  # it waited between tries


async def test_lock_that_never_clears_gives_up_with_the_reason(pve: FakePve, provider: ProxmoxProvider) -> None:
    vmid = await provider.reserve_vmid("request-stuck")
    await provider.create(spec_for(vmid))
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{vmid}/status/shutdown", "locked", times=100,
                    message=f"CT {vmid} is locked (snapshot)"))
    with pytest.raises(ProviderError, match=r"is locked \(snapshot\)"):
        await provider.stop(vmid)
    assert len(pve.calls("POST", rf"/nodes/pve/lxc/{vmid}/status/shutdown")) == provider.lock_retries + 1


async def test_parallel_creates_on_one_node_all_succeed(pve: FakePve, provider: ProxmoxProvider) -> None:
    vmids = [await provider.reserve_vmid(f"request-par-{i}") for i in range(4)]
    async with trio.open_nursery() as nursery:
        for vmid in vmids:
            nursery.start_soon(provider.create, spec_for(vmid))
    assert all(pve.containers[v].status == "running" for v in vmids)
    assert sorted(pve.created) == sorted(vmids)


async def test_concurrent_reservations_get_distinct_vmids(pve: FakePve, provider: ProxmoxProvider) -> None:
    pve.add_container(102, "made-by-hand")  # free in our table, taken in PVE
    got: dict[str, int] = {}

    async def reserve(key: str) -> None:
        got[key] = await provider.reserve_vmid(key)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(reserve, f"request-{i}")
    # PVE answers 100 to every one of them (nothing exists yet): the database made them distinct,
    # and 102, free in our table but taken in PVE, was passed over.
    assert sorted(got.values()) == [100, 101, 103, 104, 105, 106, 107, 108]
    assert len(pve.calls("GET", "/cluster/nextid")) >= 8 + 8


async def test_retried_request_creates_one_container(pve: FakePve, provider: ProxmoxProvider) -> None:
    first = await provider.reserve_vmid("request-retry")
    assert await provider.reserve_vmid("request-retry") == first
    spec = spec_for(first)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider.create, spec)
        nursery.start_soon(provider.create, spec)
    again = await provider.create(spec)
    assert pve.created == [first]
    assert again.vmid == first and pve.containers[first].status == "running"


async def test_interrupted_create_is_adopted_not_recreated(pve: FakePve, provider: ProxmoxProvider) -> None:
    vmid = await provider.reserve_vmid("request-crashed")
    pve.add_container(vmid, f"game-{vmid}")  # cloned by a process that died before configuring it
    await provider.create(spec_for(vmid))
    assert pve.created == []
    assert pve.containers[vmid].status == "running" and "zlh" in pve.containers[vmid].config["tags"]


async def test_a_vmid_held_by_a_foreign_container_is_refused(pve: FakePve, provider: ProxmoxProvider) -> None:
    pve.add_container(777, "someone-elses", status="running")
    with pytest.raises(ProviderError, match="did not create"):
        await provider.create(spec_for(777))
    assert pve.containers[777].config["hostname"] == "someone-elses"


async def test_list_vmids_lists_only_zlh_containers(pve: FakePve, provider: ProxmoxProvider) -> None:
    pve.add_container(500, "made-by-hand", tags="web")
    vmid = await provider.reserve_vmid("request-list")
    await provider.create(spec_for(vmid))
    assert await provider.list_vmids() == {vmid}


async def test_server_error_is_a_provider_error_with_the_reason(pve: FakePve, provider: ProxmoxProvider) -> None:
    vmid = await provider.reserve_vmid("request-500")
    await provider.create(spec_for(vmid))
    await provider.stop(vmid)
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{vmid}/status/start", "http", message="got unexpected error 42"))
    with pytest.raises(ProviderError, match="got unexpected error 42"):
        await provider.start(vmid)
    assert len(pve.calls("POST", rf"/nodes/pve/lxc/{vmid}/status/start")) == 2  # not retried blindly


async def test_hung_api_call_costs_one_timeout_then_succeeds(pve: FakePve, store: Store, tmp_path: Path) -> None:
    provider = make_provider(pve, store, tmp_path, proxmox_timeout=0.5)
    vmid = await provider.reserve_vmid("request-hang")
    await provider.create(spec_for(vmid))
    pve.inject(Rule("GET", rf"/nodes/pve/lxc/{vmid}/status/current", "delay", seconds=2.0))
    started = trio.current_time()
    assert await provider.status(vmid) == "running"
    assert 0.5 <= trio.current_time() - started < 1.9


async def test_wrong_token_is_refused(pve: FakePve, store: Store, tmp_path: Path) -> None:
    provider = make_provider(pve, store, tmp_path, proxmox_token_secret="not-the-secret")
    with pytest.raises(ProviderError, match="401"):
        await provider.status(100)


async def test_self_signed_certificate_is_refused_without_the_ca_bundle(pve: FakePve, store: Store,
                                                                       tmp_path: Path) -> None:
    provider = make_provider(pve, store, tmp_path, proxmox_ca_bundle="")
    assert provider.settings.proxmox_verify_ssl
    with pytest.raises(ProviderError, match="TLS verification"):
        await provider.status(100)
    assert pve.requests == []
