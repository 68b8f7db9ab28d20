"""The Proxmox provider driven through proxmoxer against the PVE-compatible HTTPS test server:
provisioning, power actions, destroy, task results as PVE defines them, lock retries, VMIDs checked
against PVE, ownership (a container of another team's is never touched), reconciliation after an
unanswered clone, DHCP that never answers."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from control.config import Settings
from control.providers.base import ContainerSpec, NotOurs, ProviderError
from control.providers.proxmox import MARKER_LINE, SECRET_LINE, Ownership, ProxmoxProvider
from storage import instances as store_instances
from storage import users
from storage.db import Store, connect_database
from storage.migrations import migrate
from storage.models import AuditLog
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
        "proxmox_task_timeout": 10.0, "proxmox_address_timeout": 5.0}
    values.update(overrides)
    return Settings.from_env(env={}, **values)


def make_provider(pve: FakePve, store: Store, tmp_path: Path, reconcile_window: float = 5.0,
                  **overrides: object) -> ProxmoxProvider:
    return ProxmoxProvider(pve_settings(pve, tmp_path, **overrides), store, backoff=0.02, max_backoff=0.1,
                           poll_interval=0.02, reconcile_window=reconcile_window)


@pytest.fixture
def provider(pve: FakePve, store: Store, tmp_path: Path) -> ProxmoxProvider:
    return make_provider(pve, store, tmp_path)


async def new_instance(store: Store, kind: str = "game") -> Any:
    """An instance row as POST /api/instances records it (its VMID proposed by our database)."""
    def record() -> Any:
        owner = users.create_user(f"{secrets.token_hex(4)}@example.com", "x")
        return store_instances.create_instance(
            vmid=store_instances.next_free_vmid(), owner=owner.id, kind=kind, name="srv", engine_type="paper",
            payload={}, allocated_ports=[], provider="proxmox", agent_secret="a" * 40, state="creating")
    return await store.run(record)


def spec_for(vmid: int, instance_id: int, kind: str = "game", secret: str = "agent-secret-" + "x" * 32
             ) -> ContainerSpec:
    return ContainerSpec(vmid=vmid, kind=kind, name=f"server {vmid}", hostname=f"{kind}-{vmid}",
                         engine_type="paper", cores=2, memory_mb=2048, disk_gb=16, agent_secret=secret,
                         instance_id=instance_id)


async def claimed(provider: ProxmoxProvider, store: Store, kind: str = "game", secret: str = "s" * 40
                  ) -> ContainerSpec:
    """What the Provisioner does before create: claim the VMID, then build the spec."""
    instance = await new_instance(store, kind)
    vmid = await provider.claim_vmid(instance.id, instance.vmid)
    return spec_for(vmid, instance.id, kind, secret)


async def audit_rows(store: Store, action: str) -> list[Any]:
    return await store.run(lambda: list(AuditLog.select().where(AuditLog.action == action)))


async def test_provision_clones_with_the_marker_and_the_secret_only_until_the_first_start(
        pve: FakePve, provider: ProxmoxProvider) -> None:
    spec = await claimed(provider, provider.store, kind="dev", secret="s" * 40)
    vmid = spec.vmid
    container = await provider.create(spec)
    ct = pve.containers[vmid]
    assert ct.status == "running" and ct.lock is None
    assert ct.config["hostname"] == f"dev-{vmid}"
    assert (ct.config["cores"], ct.config["memory"]) == ("2", "2048")
    assert set(ct.config["tags"].split(";")) == {"zlh", "zlh-dev"}
    assert "size=16G" in ct.config.get("rootfs", "size=16G")
    # The clone call itself carried the ownership marker, and no secret.
    clone = pve.calls("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone")
    assert clone and clone[0]["newid"] == str(vmid) and clone[0]["full"] == "1"
    assert provider.ownership.marker(spec.instance_id, vmid) in clone[0]["description"]
    assert SECRET_LINE not in clone[0]["description"]
    # The secret was set before the first start, and removed once it had succeeded.
    configs = pve.calls("PUT", rf"/nodes/pve/lxc/{vmid}/config")
    assert f"{SECRET_LINE} {'s' * 40}" in configs[0]["description"]
    order = pve.requests_for(vmid)
    assert order.index(("PUT", f"/nodes/pve/lxc/{vmid}/config")) < order.index(
        ("POST", f"/nodes/pve/lxc/{vmid}/status/start"))
    assert SECRET_LINE not in ct.config["description"] and "s" * 40 not in ct.config["description"]
    assert provider.ownership.owner(vmid, ct.config) == spec.instance_id
    assert container.agent_host == f"10.10.{vmid // 256 % 256}.{vmid % 256}"
    assert container.agent_port == provider.settings.proxmox_agent_port
    assert container.ide_port == provider.settings.proxmox_ide_port
    assert await provider.status(vmid) == "running"


async def test_provision_from_an_ostemplate_posts_to_the_node_with_the_marker(
        pve: FakePve, store: Store, tmp_path: Path) -> None:
    provider = make_provider(pve, store, tmp_path, proxmox_template="local:vztmpl/debian-12.tar.zst",
                             proxmox_pool="zlh-games")
    spec = await claimed(provider, store)
    container = await provider.create(spec)
    created = pve.calls("POST", "/nodes/pve/lxc")
    assert len(created) == 1
    assert created[0]["ostemplate"] == "local:vztmpl/debian-12.tar.zst"
    assert created[0]["rootfs"] == "local-lvm:16" and created[0]["pool"] == "zlh-games"
    assert provider.ownership.marker(spec.instance_id, spec.vmid) in created[0]["description"]
    assert SECRET_LINE not in created[0]["description"] and "zlh" in created[0]["tags"]
    assert container.ide_port is None and pve.containers[spec.vmid].status == "running"


async def test_stop_then_start_and_repeats_are_no_ops(pve: FakePve, provider: ProxmoxProvider) -> None:
    spec = await claimed(provider, provider.store)
    vmid = spec.vmid
    await provider.create(spec)
    await provider.stop(vmid)
    assert await provider.status(vmid) == "stopped"
    await provider.stop(vmid)
    await provider.start(vmid)
    await provider.start(vmid)
    assert await provider.status(vmid) == "running"
    assert len(pve.calls("POST", rf"/nodes/pve/lxc/{vmid}/status/start")) == 2  # create's start + one


async def test_destroy_stops_then_purges_and_a_gone_container_counts_as_destroyed(
        pve: FakePve, provider: ProxmoxProvider) -> None:
    spec = await claimed(provider, provider.store)
    vmid = spec.vmid
    await provider.create(spec)
    await provider.destroy(vmid)
    assert vmid not in pve.containers
    assert await provider.status(vmid) == "missing"
    paths = [(m, p) for m, p, _ in pve.requests if p == f"/nodes/pve/lxc/{vmid}/status/stop" or m == "DELETE"]
    assert paths == [("POST", f"/nodes/pve/lxc/{vmid}/status/stop"), ("DELETE", f"/nodes/pve/lxc/{vmid}")]
    delete = pve.calls("DELETE", rf"/nodes/pve/lxc/{vmid}")[0]
    assert delete["purge"] == "1" and delete["destroy-unreferenced-disks"] == "1"
    await provider.destroy(vmid)  # already gone
    await provider.destroy(4242)  # never existed


async def test_failed_task_raises_provider_error_with_the_task_log(pve: FakePve, provider: ProxmoxProvider) -> None:
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone", "task_error",
                    message="clone failed: storage 'local-lvm' is out of space"))
    spec = await claimed(provider, provider.store)
    with pytest.raises(ProviderError) as failure:
        await provider.create(spec)
    text = str(failure.value)
    assert "clone failed: storage 'local-lvm' is out of space" in text and "task log" in text
    assert f"starting task vzclone for {TEMPLATE}" in text  # PVE files a clone under its source
    assert spec.vmid not in pve.containers


async def test_start_ending_with_warnings_succeeds_and_the_warnings_are_kept(
        pve: FakePve, provider: ProxmoxProvider) -> None:
    spec = await claimed(provider, provider.store)
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{spec.vmid}/status/start", "task_warning",
                    message="Systemd 232 detected. You may need to enable nesting."))
    container = await provider.create(spec)
    assert pve.containers[spec.vmid].status == "running" and container.agent_host
    assert spec.vmid in pve.containers  # not destroyed as a failure
    rows = await audit_rows(provider.store, "instance.pve_warnings")
    assert [row.target for row in rows] == [f"instance:{spec.instance_id}"]
    details = rows[0].details
    assert details["exitstatus"] == "WARNINGS: 1" and details["vmid"] == spec.vmid
    assert details["warnings"] == ["WARN: Systemd 232 detected. You may need to enable nesting."]


async def test_a_task_ending_in_anything_else_fails(pve: FakePve, provider: ProxmoxProvider) -> None:
    spec = await claimed(provider, provider.store)
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{spec.vmid}/status/start", "task_error",
                    message="WARNINGS: many"))  # not `WARNINGS: <n>`: PVE calls it an error
    with pytest.raises(ProviderError, match="WARNINGS: many"):
        await provider.create(spec)


async def test_locked_container_is_retried_with_backoff(pve: FakePve, provider: ProxmoxProvider) -> None:
    spec = await claimed(provider, provider.store)
    vmid = spec.vmid
    pve.inject(Rule("PUT", rf"/nodes/pve/lxc/{vmid}/config", "locked", times=2,
                    message=f"CT {vmid} is locked (backup)"))
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone", "task_error",
                    message=f"can't lock file '/run/lock/lxc/pve-config-{TEMPLATE}.lock' - got timeout"))
    started = trio.current_time()
    await provider.create(spec)
    assert pve.containers[vmid].status == "running"
    assert len(pve.calls("PUT", rf"/nodes/pve/lxc/{vmid}/config")) == 3 + 1  # 2 locked, configure, scrub
    assert len(pve.calls("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone")) == 2
    assert trio.current_time() - started >= 0.02 + 0.04  # it waited between tries


async def test_lock_that_never_clears_gives_up_with_the_reason(pve: FakePve, provider: ProxmoxProvider) -> None:
    spec = await claimed(provider, provider.store)
    await provider.create(spec)
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{spec.vmid}/status/shutdown", "locked", times=100,
                    message=f"CT {spec.vmid} is locked (snapshot)"))
    with pytest.raises(ProviderError, match=r"is locked \(snapshot\)"):
        await provider.stop(spec.vmid)
    assert len(pve.calls("POST", rf"/nodes/pve/lxc/{spec.vmid}/status/shutdown")) == provider.lock_retries + 1


async def test_parallel_creates_on_one_node_all_succeed(pve: FakePve, provider: ProxmoxProvider) -> None:
    specs = [await claimed(provider, provider.store) for _ in range(4)]
    async with trio.open_nursery() as nursery:
        for spec in specs:
            nursery.start_soon(provider.create, spec)
    assert all(pve.containers[s.vmid].status == "running" for s in specs)
    assert sorted(pve.created) == sorted(s.vmid for s in specs)


async def test_concurrent_claims_get_distinct_vmids_and_skip_what_pve_holds(
        pve: FakePve, provider: ProxmoxProvider) -> None:
    instances = [await new_instance(provider.store) for _ in range(6)]
    proposed = [i.vmid for i in instances]
    pve.add_container(proposed[2], "made-by-hand")  # free in our tables, taken in PVE
    got: dict[int, int] = {}

    async def claim(instance: Any) -> None:
        got[instance.id] = await provider.claim_vmid(instance.id, instance.vmid)

    async with trio.open_nursery() as nursery:
        for instance in instances:
            nursery.start_soon(claim, instance)
    assert len(set(got.values())) == 6 and proposed[2] not in got.values()
    assert got[instances[0].id] == proposed[0]
    # Every row holds the VMID it claimed, and claiming again answers the same.
    for instance in instances:
        row = await provider.store.run(store_instances.get_instance, instance.id)
        assert row is not None and row.vmid == got[instance.id]
        assert await provider.claim_vmid(instance.id, row.vmid) == row.vmid
    assert pve.mutations_of(proposed[2]) == []


async def test_a_foreign_container_at_the_chosen_vmid_is_never_touched(pve: FakePve,
                                                                      provider: ProxmoxProvider) -> None:
    instance = await new_instance(provider.store)
    foreign = instance.vmid
    pve.add_container(foreign, "other-team-db", status="running", tags="zlh")  # even a look-alike tag
    vmid = await provider.claim_vmid(instance.id, instance.vmid)
    assert vmid != foreign and vmid not in pve.containers
    row = await provider.store.run(store_instances.get_instance, instance.id)
    assert row is not None and row.vmid == vmid
    skipped = await audit_rows(provider.store, "instance.vmid_skipped")
    assert skipped[0].details["vmid"] == foreign
    await provider.create(spec_for(vmid, instance.id))
    # Even asked directly, every mutating call on the foreign container is refused before it is made.
    for action in (provider.destroy, provider.stop, provider.start):
        with pytest.raises(NotOurs, match="no ZLH ownership marker"):
            await action(foreign)
    with pytest.raises(NotOurs):
        await provider.create(spec_for(foreign, instance.id))
    assert pve.mutations_of(foreign) == []
    assert pve.containers[foreign].status == "running"
    assert pve.containers[foreign].config["hostname"] == "other-team-db"
    assert foreign not in await provider.list_vmids()


async def test_retried_request_creates_one_container(pve: FakePve, provider: ProxmoxProvider) -> None:
    spec = await claimed(provider, provider.store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider.create, spec)
        nursery.start_soon(provider.create, spec)
    again = await provider.create(spec)
    assert pve.created == [spec.vmid]
    assert again.vmid == spec.vmid and pve.containers[spec.vmid].status == "running"


async def test_interrupted_create_is_adopted_by_its_marker_not_its_hostname(
        pve: FakePve, provider: ProxmoxProvider) -> None:
    spec = await claimed(provider, provider.store)
    # Cloned by a process that died before configuring it: marker, no tag yet.
    pve.add_container(spec.vmid, spec.hostname, description=provider.ownership.marker(spec.instance_id, spec.vmid))
    await provider.create(spec)
    assert pve.created == []
    assert pve.containers[spec.vmid].status == "running" and "zlh" in pve.containers[spec.vmid].config["tags"]
    # The same hostname without a marker (or with another instance's) is not ours to adopt.
    other = await claimed(provider, provider.store)
    pve.add_container(other.vmid, other.hostname)
    with pytest.raises(NotOurs):
        await provider.create(other)
    pve.add_container(other.vmid, other.hostname, description=provider.ownership.marker(spec.instance_id, other.vmid))
    with pytest.raises(NotOurs, match=f"belongs to ZLH instance {spec.instance_id}"):
        await provider.create(other)
    assert pve.mutations_of(other.vmid) == []


def test_a_marker_verifies_only_at_its_vmid_and_under_our_key() -> None:
    ours = Ownership(TEST_SECRET)
    marker = ours.marker(7, 1005)
    assert marker.startswith(MARKER_LINE) and ours.owner(1005, {"description": f"hi\n{marker}\n"}) == 7
    assert ours.owner(1006, {"description": marker}) is None  # copied into another container
    assert Ownership("another-deployment-secret-" + "x" * 16).owner(1005, {"description": marker}) is None
    tampered = marker[:-1] + ("1" if marker.endswith("0") else "0")
    assert ours.owner(1005, {"description": tampered}) is None
    assert ours.owner(1005, {}) is None


async def test_list_vmids_lists_marked_containers_even_without_the_tag(pve: FakePve,
                                                                      provider: ProxmoxProvider) -> None:
    pve.add_container(500, "made-by-hand", tags="web")
    pve.add_container(501, "tagged-by-hand", tags="zlh")  # the tag alone proves nothing
    spec = await claimed(provider, provider.store)
    await provider.create(spec)
    half = await claimed(provider, provider.store)  # a clone that never got configured: untagged
    pve.add_container(half.vmid, half.hostname, description=provider.ownership.marker(half.instance_id, half.vmid))
    assert await provider.list_vmids() == {spec.vmid, half.vmid}
    await provider.destroy(half.vmid)
    assert half.vmid not in pve.containers


async def test_delete_of_an_unmarked_container_at_a_vmid_we_once_held_is_refused(
        pve: FakePve, provider: ProxmoxProvider) -> None:
    spec = await claimed(provider, provider.store)
    await provider.create(spec)
    # Ours was removed by hand in PVE, and another team made a container at the same VMID.
    pve.add_container(spec.vmid, "someone-elses", status="running")
    before = len(pve.mutations_of(spec.vmid))
    with pytest.raises(NotOurs, match=f"refused to destroy CT {spec.vmid}"):
        await provider.destroy(spec.vmid)
    assert pve.mutations_of(spec.vmid)[before:] == []
    assert pve.containers[spec.vmid].status == "running"


async def test_clone_answered_after_the_client_timeout_is_adopted(pve: FakePve, store: Store,
                                                                 tmp_path: Path) -> None:
    provider = make_provider(pve, store, tmp_path, proxmox_timeout=0.5)
    spec = await claimed(provider, store)
    # PVE waits on a config lock, answers after our timeout, and carries the clone out all the same.
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone", "delay", seconds=0.8))
    container = await provider.create(spec)
    assert pve.created == [spec.vmid]  # adopted, not cloned twice
    ct = pve.containers[spec.vmid]
    assert ct.status == "running" and "zlh" in ct.config["tags"] and container.vmid == spec.vmid
    assert len(pve.calls("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone")) == 1
    assert pve.calls("GET", r"/nodes/pve/lxc/\d+/config")  # it looked before deciding


async def test_late_clone_whose_task_fails_fails_with_its_log_and_leaves_nothing(
        pve: FakePve, store: Store, tmp_path: Path) -> None:
    provider = make_provider(pve, store, tmp_path, proxmox_timeout=0.5)
    spec = await claimed(provider, store)
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone", "task_error", seconds=0.8,
                    message="zfs error: out of space"))
    with pytest.raises(ProviderError, match="zfs error: out of space"):
        await provider.create(spec)
    assert spec.vmid not in pve.containers
    assert pve.calls("GET", "/nodes/pve/tasks")  # the task list told what happened


async def test_a_dropped_clone_that_never_happened_fails_clearly(pve: FakePve, store: Store,
                                                                 tmp_path: Path) -> None:
    provider = make_provider(pve, store, tmp_path, reconcile_window=0.5, proxmox_timeout=0.3)
    spec = await claimed(provider, store)
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone", "drop"))
    with pytest.raises(ProviderError, match=r"no trace of it after 0.5s more \(not carried out\)"):
        await provider.create(spec)
    assert pve.created == [] and len(pve.calls("POST", rf"/nodes/pve/lxc/{TEMPLATE}/clone")) == 1
    assert pve.calls("GET", "/nodes/pve/tasks")


async def test_dhcp_that_never_answers_fails_with_the_reason_and_cleans_up(pve: FakePve, store: Store,
                                                                          tmp_path: Path) -> None:
    provider = make_provider(pve, store, tmp_path, proxmox_address_timeout=0.5)
    pve.dhcp_answers = False
    spec = await claimed(provider, store)
    started = trio.current_time()
    with pytest.raises(ProviderError, match=r"no IPv4 address on eth0 within 0.5s \(DHCP never answered\)"):
        await provider.create(spec)
    assert 0.5 <= trio.current_time() - started < 4
    await provider.destroy(spec.vmid)  # what the Provisioner's cleanup does
    assert spec.vmid not in pve.containers


async def test_server_error_is_a_provider_error_with_the_reason(pve: FakePve, provider: ProxmoxProvider) -> None:
    spec = await claimed(provider, provider.store)
    await provider.create(spec)
    await provider.stop(spec.vmid)
    pve.inject(Rule("POST", rf"/nodes/pve/lxc/{spec.vmid}/status/start", "http", message="got unexpected error 42"))
    with pytest.raises(ProviderError, match="got unexpected error 42"):
        await provider.start(spec.vmid)
    assert len(pve.calls("POST", rf"/nodes/pve/lxc/{spec.vmid}/status/start")) == 2  # not retried blindly


async def test_hung_api_call_costs_one_timeout_then_succeeds(pve: FakePve, store: Store, tmp_path: Path) -> None:
    provider = make_provider(pve, store, tmp_path, proxmox_timeout=0.5)
    spec = await claimed(provider, store)
    await provider.create(spec)
    pve.inject(Rule("GET", rf"/nodes/pve/lxc/{spec.vmid}/status/current", "delay", seconds=2.0))
    started = trio.current_time()
    assert await provider.status(spec.vmid) == "running"
    assert 0.5 <= trio.current_time() - started < 1.9


async def test_the_default_call_timeout_outlasts_pves_lock_wait(pve: FakePve, store: Store, tmp_path: Path) -> None:
    settings = Settings.from_env(env={"PROXMOX_ADDRESS_TIMEOUT": "45"}, data_dir=tmp_path, jwt_secret=TEST_SECRET)
    assert settings.proxmox_timeout > 10.0  # PVE waits up to 10 s for a config lock before it answers
    assert settings.proxmox_address_timeout == 45.0
    # Even with a short call timeout, an unanswered create is watched for longer than PVE's lock wait.
    short = ProxmoxProvider(pve_settings(pve, tmp_path, proxmox_timeout=2.0), store)
    assert short.reconcile_window > 10.0


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
