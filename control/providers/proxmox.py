"""The Proxmox provider: ZLH containers as LXC containers on one PVE node, through its HTTPS API.

It shares the node with containers other teams made, so its first rule is: **never touch a container
it cannot prove it created.** The proof is the ownership marker, a description line written in the
clone/create call itself (PVE writes the description into the new config before the task starts):

    zlh-instance: <instance id> vmid=<vmid> nonce=<HMAC-SHA256(key, "<instance id>:<vmid>")[:32]>

The key is derived from JWT_SECRET, so nobody without it can write a marker that verifies, and a marker
copied into another container (a clone of ours made by hand) does not verify there (the VMID is
signed). The nonce is per provisioning (one instance id each) and the same on every retry, resume or
replica, so no extra state is needed to recognise our own half-made container. A container is ours
when its marker verifies; the `zlh` tag (set in the same call and again when configured) is a label
for people and listings, never the proof. Every stop, config, resize, start and delete reads the config
first and refuses with `NotOurs` otherwise; the orphan listing lists marked containers, tagged or not.

VMIDs: the instance row proposes one; before it is used, PVE is asked (`/cluster/resources?type=vm`
and the node's config): a VMID PVE knows that is not ours is skipped, the next is reserved in our
database (`storage.edge.reserve_vmid`, held per instance, the same on every retry) and the instance
moves to it, so concurrent provisionings on one or several replicas never collide.

Reconciliation: a clone or create that gets no answer (timeout, dropped connection) may still have
been carried out — PVE waits up to 10 s for a config lock before it answers, which is why the per-call
timeout defaults to 30 s. The provider never assumes: it looks at the node's config (the marker) and
its task list for up to one more call timeout (at least PVE's 10 s lock wait and a margin). A marked
container, or a task of ours, means the call took effect: it is adopted (its task awaited, its result
taken as PVE defines it) and provisioning goes on; a task that failed fails provisioning with the task
log (PVE removed the half-made container); no trace means it did not happen. A provisioning abandoned
later destroys the (marked) container in its cleanup; one that lands even later still carries the
marker, so the orphan listing and admin delete find it — nothing of ours is left that nothing tracks.

Tasks follow PVE (control/providers/pve_tasks.py): `OK` and `WARNINGS: n` succeed — the warning lines
are kept as instance events in the audit log (`instance.pve_warnings`) — anything else fails with the
task log. Parallel clones on one node collide on storage and config locks, so creates are serialized
per process and lock errors retried with backoff.

The agent's bootstrap secret is not in the clone/create call: it is written (`zlh-agent-secret:` line)
by the config call just before the first start, where the template's PVE hookscript hands it to the
agent at pre-start, and removed from the description as soon as that start has succeeded."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from typing import Any
from urllib.parse import urlsplit

import trio
from proxmoxer import ProxmoxAPI

from storage import edge as edge_store
from storage import instances as store_instances
from storage import users
from storage.db import Store

from ..config import Settings
from .base import Container, ContainerSpec, NotOurs, ProviderError
from .pve_tasks import CallUnanswered, ContainerMissing, PveNode, TaskFailed, TaskOutcome

log = logging.getLogger("zlh.proxmox")

TAG = "zlh"
SECRET_LINE = "zlh-agent-secret:"
MARKER_LINE = "zlh-instance:"
_MARKER = re.compile(r"^zlh-instance: (\d+) vmid=(\d+) nonce=([0-9a-f]{32})$", re.MULTILINE)
_EXISTS = re.compile(r"already exists", re.IGNORECASE)
PVE_LOCK_WAIT = 10.0  # PVE waits this long for a config lock before it answers (or fails) a call

__all__ = ["MARKER_LINE", "SECRET_LINE", "TAG", "ContainerMissing", "NotOurs", "Ownership", "ProxmoxProvider",
           "TaskFailed", "container_tags", "disk_size_gb"]


def container_tags(config: dict[str, Any]) -> set[str]:
    return {t for t in re.split(r"[;, ]+", str(config.get("tags") or "")) if t}


def disk_size_gb(rootfs: str) -> int | None:
    """The `size=` of a PVE volume string in GiB (`local-lvm:vm-101-disk-0,size=8G` → 8)."""
    match = re.search(r"size=(\d+(?:\.\d+)?)([KMGT]?)", rootfs)
    if match is None:
        return None
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1, "T": 1024, "": 1 / 1024**3}[match.group(2)]
    return int(float(match.group(1)) * scale)


class Ownership:
    """Writes and verifies the marker line (see the module docstring)."""

    def __init__(self, secret: str) -> None:
        self._key = hmac.new(secret.encode(), b"zlh-proxmox-ownership-marker", hashlib.sha256).digest()

    def _nonce(self, instance_id: int, vmid: int) -> str:
        return hmac.new(self._key, f"{instance_id}:{vmid}".encode(), hashlib.sha256).hexdigest()[:32]

    def marker(self, instance_id: int, vmid: int) -> str:
        return f"{MARKER_LINE} {instance_id} vmid={vmid} nonce={self._nonce(instance_id, vmid)}"

    def owner(self, vmid: int, config: dict[str, Any]) -> int | None:
        """The instance id whose verified marker the container at `vmid` carries, else None."""
        for match in _MARKER.finditer(str(config.get("description") or "")):
            instance_id, signed_vmid, nonce = int(match.group(1)), int(match.group(2)), match.group(3)
            if signed_vmid == vmid and hmac.compare_digest(nonce, self._nonce(instance_id, vmid)):
                return instance_id
        return None


class ProxmoxProvider:
    name = "proxmox"

    def __init__(self, settings: Settings, store: Store, *, lock_retries: int = 8, backoff: float = 0.5,
                 max_backoff: float = 15.0, poll_interval: float = 0.25,
                 reconcile_window: float | None = None) -> None:
        if not (settings.proxmox_url and settings.proxmox_token_id and settings.proxmox_node):
            raise ProviderError("the Proxmox provider needs PROXMOX_URL, PROXMOX_TOKEN_ID and PROXMOX_NODE")
        url = urlsplit(settings.proxmox_url)
        if url.scheme != "https" or not url.hostname:
            raise ProviderError("PROXMOX_URL must be https://host[:port]")
        user, _, token_name = settings.proxmox_token_id.partition("!")
        verify: bool | str = settings.proxmox_ca_bundle or settings.proxmox_verify_ssl
        self.settings = settings
        self.store = store
        self.node = settings.proxmox_node
        self.poll_interval = poll_interval
        # How long an unanswered create may take to show in PVE: one more call timeout, and at least
        # PVE's own lock wait (plus a margin) when the call timeout was set below it.
        self.reconcile_window = reconcile_window or max(settings.proxmox_timeout, PVE_LOCK_WAIT + 5.0)
        self.ownership = Ownership(settings.jwt_secret)
        api = ProxmoxAPI(url.hostname, port=url.port or 8006, user=user, token_name=token_name,
                         token_value=settings.proxmox_token_secret, verify_ssl=verify,
                         timeout=settings.proxmox_timeout, backend="https", service="PVE")
        self.pve = PveNode(api, self.node, user=settings.proxmox_token_id, task_timeout=settings.proxmox_task_timeout,
                           lock_retries=lock_retries, backoff=backoff, max_backoff=max_backoff,
                           poll_interval=poll_interval)
        self._create_lock = trio.Lock()  # one create/clone at a time on this node (storage locks)

    @property
    def lock_retries(self) -> int:
        return self.pve.lock_retries

    # reading a container, and proving it is ours

    async def _current(self, vmid: int) -> dict[str, Any] | None:
        try:
            return await self.pve.call(f"status of CT {vmid}", self.pve.lxc(vmid).status.current.get, idempotent=True)
        except ContainerMissing:
            return None

    async def _config(self, vmid: int) -> dict[str, Any] | None:
        try:
            return await self.pve.call(f"config of CT {vmid}", self.pve.lxc(vmid).config.get, idempotent=True)
        except ContainerMissing:
            return None

    def _owner_or_refuse(self, vmid: int, config: dict[str, Any], action: str,
                         instance_id: int | None = None) -> int:
        """The owning instance id from the verified marker; NotOurs (nothing done) otherwise."""
        owner = self.ownership.owner(vmid, config)
        if owner is None:
            raise NotOurs(f"refused to {action} CT {vmid}: it carries no ZLH ownership marker "
                          f"(a container ZLH did not create; left untouched)")
        if instance_id is not None and owner != instance_id:
            raise NotOurs(f"refused to {action} CT {vmid}: it belongs to ZLH instance {owner}, not {instance_id}")
        return owner

    async def _owned(self, vmid: int, action: str) -> tuple[dict[str, Any], int] | None:
        """The config and owner of the container at `vmid` if it is ours, None if there is none."""
        config = await self._config(vmid)
        if config is None:
            return None
        return config, self._owner_or_refuse(vmid, config, action)

    async def _wait_unlocked(self, vmid: int) -> dict[str, Any]:
        """Wait out a create/clone that another caller (or a crashed earlier attempt) has in flight."""
        with trio.move_on_after(self.settings.proxmox_task_timeout):
            while True:
                current = await self._current(vmid)
                if current is None:
                    raise ContainerMissing(f"CT {vmid} disappeared while being created")
                if not current.get("lock"):
                    return current
                await trio.sleep(self.poll_interval)
        raise ProviderError(f"CT {vmid} stayed locked for {self.settings.proxmox_task_timeout:.0f}s")

    async def _record_warnings(self, instance_id: int, vmid: int, what: str, outcome: TaskOutcome) -> None:
        if not outcome.warnings:
            return
        log.warning("PVE task ended with warnings", extra={"fields": {
            "vmid": vmid, "what": what, "exitstatus": outcome.exitstatus}})
        await self.store.run(users.audit, "instance.pve_warnings", None, f"instance:{instance_id}", vmid=vmid,
                             task=what, upid=outcome.upid, exitstatus=outcome.exitstatus,
                             warnings=list(outcome.warnings))

    # VMIDs

    async def _vmids_in_pve(self) -> set[int]:
        resources = await self.pve.call("cluster resources", lambda: self.pve.api.cluster.resources.get(type="vm"),
                                        idempotent=True)
        return {int(r["vmid"]) for r in resources or [] if "vmid" in r}

    async def claim_vmid(self, instance_id: int, vmid: int) -> int:
        """The VMID instance `instance_id` (proposed `vmid`) is created at: reserved in our database for
        it, unknown to PVE or holding our own container for it; the instance row is moved to it. The
        same answer on every retry and replica."""
        key = f"instance:{instance_id}"
        in_pve = await self._vmids_in_pve()
        skip: set[int] = set()
        for _ in range(edge_store.MAX_RESERVATION_TRIES):
            candidate = await self.store.run(edge_store.reserve_vmid, key, vmid, frozenset(skip))
            config = await self._config(candidate)
            held = config is not None or candidate in in_pve
            if held and (config is None or self.ownership.owner(candidate, config) != instance_id):
                log.warning("VMID held in PVE by something ZLH did not create, skipped",
                            extra={"fields": {"vmid": candidate, "instance": instance_id}})
                await self.store.run(users.audit, "instance.vmid_skipped", None, f"instance:{instance_id}",
                                     vmid=candidate, reason="held in PVE by a container ZLH did not create")
                await self.release_vmid(candidate)
                skip.add(candidate)
                continue
            if candidate == vmid or await self.store.run(store_instances.move_instance_vmid, instance_id, vmid,
                                                         candidate):
                return candidate
            await self.release_vmid(candidate)  # another instance holds it in our table
            skip.add(candidate)
        raise ProviderError(f"no free VMID from {vmid}")

    async def release_vmid(self, vmid: int) -> None:
        await self.store.run(edge_store.release_vmid, vmid)

    # creating

    def _description(self, spec: ContainerSpec, *, with_secret: bool) -> str:
        lines = [f"ZLH {spec.kind} {spec.name!r} ({spec.engine_type})",
                 self.ownership.marker(spec.instance_id, spec.vmid)]
        if with_secret:
            lines.append(f"{SECRET_LINE} {spec.agent_secret}")
        return "\n".join(lines) + "\n"

    def _settings_for(self, spec: ContainerSpec) -> dict[str, Any]:
        return {
            "hostname": spec.hostname,
            "cores": spec.cores,
            "memory": spec.memory_mb,
            "swap": self.settings.proxmox_swap_mb,
            "net0": f"name=eth0,bridge={self.settings.proxmox_bridge},ip=dhcp",
            "tags": f"{TAG};{TAG}-{spec.kind}",
            "onboot": 1,
            "description": self._description(spec, with_secret=True),
        }

    async def create(self, spec: ContainerSpec) -> Container:
        vmid = spec.vmid
        config = await self._config(vmid)
        if config is None:
            async with self._create_lock:
                if await self._config(vmid) is None:  # not made meanwhile by a concurrent retry
                    await self._make(spec)
            try:
                await self._wait_unlocked(vmid)
            except ContainerMissing:
                raise await self._make_failure(spec, time.time() - self.settings.proxmox_task_timeout) from None
            config = await self._config(vmid)
            if config is None:
                raise ProviderError(f"CT {vmid} vanished right after it was created")
        self._owner_or_refuse(vmid, config, "configure", spec.instance_id)
        if config.get("lock"):
            await self._wait_unlocked(vmid)
        await self.pve.call(f"configure CT {vmid}", lambda: self.pve.lxc(vmid).config.put(**self._settings_for(spec)),
                            idempotent=True)
        size = disk_size_gb(str(config.get("rootfs", "")))
        if size is not None and size < spec.disk_gb:
            outcome = await self.pve.run_task(f"resize CT {vmid}", lambda: self.pve.lxc(vmid).resize.put(
                disk="rootfs", size=f"{spec.disk_gb}G"))
            await self._record_warnings(spec.instance_id, vmid, f"resize CT {vmid}", outcome)
        await self._start(vmid, spec.instance_id)
        await self.pve.call(f"remove the bootstrap secret of CT {vmid}", lambda: self.pve.lxc(vmid).config.put(
            description=self._description(spec, with_secret=False)), idempotent=True)
        return Container(vmid=vmid, provider_ref=f"{self.node}/{vmid}", agent_host=await self._address(vmid),
                         agent_port=self.settings.proxmox_agent_port,
                         ide_port=self.settings.proxmox_ide_port if spec.kind == "dev" else None)

    def placement(self, spec: ContainerSpec) -> str:
        return f"{self.node}/{spec.vmid}"  # the VMID is claimed (checked against PVE, reserved) before the clone

    async def find(self, vmid: int, provider_ref: str, agent_secret: str) -> Container | None:
        """The running CT of ours at the recorded VMID (its marker verified), for a resumed
        provisioning to adopt; None if nothing is there or it is not running yet — then `create`,
        which is idempotent on a marked CT, carries on from where the dead driver stopped. A CT
        without our marker is NotOurs: never adopted, never touched."""
        if provider_ref != f"{self.node}/{vmid}":
            return None
        config = await self._config(vmid)
        if config is None:
            return None
        self._owner_or_refuse(vmid, config, "adopt")
        return await self.current(vmid)

    def _make_call(self, spec: ContainerSpec) -> tuple[str, str, int, Any]:
        """(what, task type, VMID the task is filed under, the call) for the clone or create."""
        template = self.settings.proxmox_template
        if not template:
            raise ProviderError("PROXMOX_TEMPLATE is not set (a template VMID to clone or an ostemplate volume)")
        pool = self.settings.proxmox_pool or None
        # Marker and tags go in the call itself: whatever PVE makes of it is recognisably ours.
        marked = {"description": self._description(spec, with_secret=False), "tags": f"{TAG};{TAG}-{spec.kind}"}
        if template.isdigit():
            return (f"clone template {template} to CT {spec.vmid}", "vzclone", int(template),
                    lambda: self.pve.lxc(int(template)).clone.post(
                        newid=spec.vmid, hostname=spec.hostname, full=1, storage=self.settings.proxmox_storage,
                        pool=pool, description=marked["description"]))
        settings = {**self._settings_for(spec), **marked}
        del settings["hostname"]
        return (f"create CT {spec.vmid}", "vzcreate", spec.vmid, lambda: self.pve.lxc().post(
            vmid=spec.vmid, ostemplate=template, hostname=spec.hostname, unprivileged=1, pool=pool,
            rootfs=f"{self.settings.proxmox_storage}:{spec.disk_gb}", **settings))

    async def _make(self, spec: ContainerSpec) -> None:
        what, _kind, _task_vmid, call = self._make_call(spec)
        since = time.time()
        try:
            outcome = await self.pve.run_task(what, call)
        except CallUnanswered as exc:
            await self._reconcile_make(spec, exc, since)
            return
        except ProviderError as exc:
            if not _EXISTS.search(str(exc)):
                raise
            log.info("CT already exists, checking whether it is ours", extra={"fields": {"vmid": spec.vmid}})
            return
        await self._record_warnings(spec.instance_id, spec.vmid, what, outcome)

    async def _reconcile_make(self, spec: ContainerSpec, unanswered: CallUnanswered, since: float) -> None:
        """The clone/create went unanswered: find out what PVE did before deciding. Returns when the
        container exists (the caller checks the marker and waits for its task); raises TaskFailed if
        the task PVE started failed, ProviderError if PVE shows no trace of the call."""
        what, kind, task_vmid, _ = self._make_call(spec)
        log.warning("no answer to a create, reconciling",
                    extra={"fields": {"vmid": spec.vmid, "reason": str(unanswered)}})
        window = self.reconcile_window
        awaited: set[str] = set()
        with trio.move_on_after(window):
            while True:
                if await self._config(spec.vmid) is not None:
                    log.info("unanswered create took effect: adopting", extra={"fields": {"vmid": spec.vmid}})
                    return
                task = await self.pve.find_task(kind, task_vmid, since)
                if task is not None and str(task["upid"]) not in awaited:
                    # A clone's task names only its source: another caller's clone of the same template
                    # may be the one found, so only a failure with our container absent is decisive.
                    awaited.add(str(task["upid"]))
                    try:
                        outcome = await self.pve.wait_task(what, str(task["upid"]))
                    except TaskFailed:
                        if await self._config(spec.vmid) is None:
                            raise
                        continue
                    await self._record_warnings(spec.instance_id, spec.vmid, what, outcome)
                    continue
                await trio.sleep(self.poll_interval)
        raise ProviderError(f"{what}: {unanswered}; PVE shows no trace of it after {window:g}s more (not carried out)")

    async def _make_failure(self, spec: ContainerSpec, since: float) -> ProviderError:
        """The half-made container disappeared (PVE removes it when the task fails): the task's reason."""
        what, kind, task_vmid, _ = self._make_call(spec)
        task = await self.pve.find_task(kind, task_vmid, since)
        if task is not None:
            try:
                await self.pve.wait_task(what, str(task["upid"]))
            except TaskFailed as exc:
                return exc
        return ContainerMissing(f"CT {spec.vmid} disappeared while being created")

    async def _address(self, vmid: int) -> str:
        """The container's IPv4 address on eth0, as the node reports it once DHCP has answered."""
        timeout = self.settings.proxmox_address_timeout
        with trio.move_on_after(timeout):
            while True:
                interfaces = await self.pve.call(f"interfaces of CT {vmid}", self.pve.lxc(vmid).interfaces.get,
                                                 idempotent=True)
                for interface in interfaces or []:  # null while the container is stopped
                    if interface.get("name") == "eth0" and interface.get("inet"):
                        return str(interface["inet"]).split("/")[0]
                await trio.sleep(self.poll_interval)
        raise ProviderError(f"CT {vmid} got no IPv4 address on eth0 within {timeout:g}s (DHCP never answered)")

    # the rest of the Provider interface

    async def current(self, vmid: int) -> Container | None:
        """The running container of ours at `vmid` with its agent address, or None."""
        status = await self._current(vmid)
        if status is None or status.get("status") != "running":
            return None
        config = await self._config(vmid) or {}
        if TAG not in container_tags(config) or self.ownership.owner(vmid, config) is None:
            return None
        kind = "dev" if f"{TAG}-dev" in container_tags(config) else "game"
        return Container(vmid=vmid, provider_ref=f"{self.node}/{vmid}", agent_host=await self._address(vmid),
                         agent_port=self.settings.proxmox_agent_port,
                         ide_port=self.settings.proxmox_ide_port if kind == "dev" else None)

    async def start(self, vmid: int) -> None:
        await self._start(vmid, None)

    async def _start(self, vmid: int, instance_id: int | None) -> None:
        status = await self._current(vmid)
        if status is None:
            raise ProviderError(f"CT {vmid} does not exist")
        config = await self._config(vmid) or {}
        owner = self._owner_or_refuse(vmid, config, "start", instance_id)
        if status.get("status") == "running":
            return
        try:
            outcome = await self.pve.run_task(f"start CT {vmid}", self.pve.lxc(vmid).status.start.post)
        except ProviderError as exc:
            if "already running" not in str(exc):
                raise
            return
        await self._record_warnings(owner, vmid, f"start CT {vmid}", outcome)

    async def stop(self, vmid: int) -> None:
        status = await self._current(vmid)
        if status is None or status.get("status") == "stopped":
            return
        owned = await self._owned(vmid, "stop")
        if owned is None:
            return
        outcome = await self.pve.run_task(f"shut down CT {vmid}",
                                          lambda: self.pve.lxc(vmid).status.shutdown.post(timeout=30, forceStop=1))
        await self._record_warnings(owned[1], vmid, f"shut down CT {vmid}", outcome)

    async def status(self, vmid: int) -> str:
        current = await self._current(vmid)
        if current is None:
            return "missing"
        return "running" if current.get("status") == "running" else "stopped"

    async def destroy(self, vmid: int) -> None:
        """Stop, then purge with its unreferenced disks — only a container of ours (NotOurs otherwise,
        nothing done); a container already gone counts as destroyed."""
        try:
            current = await self._current(vmid)
            owned = await self._owned(vmid, "destroy") if current is not None else None
            if current is not None and owned is not None:
                if current.get("status") == "running":
                    await self.pve.run_task(f"stop CT {vmid}", self.pve.lxc(vmid).status.stop.post)
                await self.pve.run_task(f"destroy CT {vmid}", lambda: self.pve.lxc(vmid).delete(
                    purge=1, **{"destroy-unreferenced-disks": 1}))
        except ContainerMissing:
            pass
        await self.release_vmid(vmid)

    async def list_vmids(self) -> set[int]:
        """Every container of ours on the node: marked, whether or not its tag arrived."""
        listing = await self.pve.call("list containers", self.pve.lxc().get, idempotent=True)
        ours: set[int] = set()
        for ct in listing or []:
            if ct.get("template"):
                continue
            vmid = int(ct["vmid"])
            config = await self._config(vmid)
            if config is not None and self.ownership.owner(vmid, config) is not None:
                ours.add(vmid)
        return ours

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing runs in the background: each PVE task is awaited by the call that started it."""
        task_status.started()
        await trio.sleep_forever()
