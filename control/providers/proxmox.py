"""The Proxmox provider: ZLH containers as LXC containers on one PVE node, through its HTTPS API.

Why proxmoxer through worker threads: it is the client the project names, it speaks the API exactly
(token header, form bodies, `{"data": …}`, errors from the reason phrase), and each call is a single
short request, so a thread hop per call (bounded by a CapacityLimiter, bounded in time by the
per-call `timeout` handed to requests) costs little. Its `Tasks.blocking_status` sleeps with
time.sleep and is never used: PVE tasks are polled here with trio.sleep, and anything but
`exitstatus == "OK"` is a failure that carries the task log.

PVE pitfalls handled here: `/cluster/nextid` answers the same VMID to concurrent callers, so VMIDs
are reserved in our own database (`reserve_vmid`, one per provisioning request, the same on every
retry); parallel clones on one node collide on storage and config locks, so creates are serialized per
node and "CT is locked" / "can't lock file" is retried with backoff; a retried create adopts the
container it made before instead of making a second. The agent's bootstrap secret travels in the
container's description (`zlh-agent-secret:` line), where the template's PVE hookscript hands it to
the agent at pre-start. This module must never touch a container it did not create: only containers
tagged `zlh` are listed, adopted or reported as ours."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
import trio
from proxmoxer import ProxmoxAPI, ResourceException

from storage import edge as edge_store
from storage.db import Store

from ..config import Settings
from .base import Container, ContainerSpec, ProviderError

log = logging.getLogger("zlh.proxmox")

T = TypeVar("T")

TAG = "zlh"
SECRET_LINE = "zlh-agent-secret:"
_LOCKED = re.compile(r"is locked|can't lock file|got timeout", re.IGNORECASE)
_MISSING = re.compile(r"does not exist", re.IGNORECASE)
_EXISTS = re.compile(r"already exists", re.IGNORECASE)
_TRANSIENT_STATUS = {502, 503, 504, 596}


class ContainerMissing(ProviderError):
    pass


class TaskFailed(ProviderError):
    def __init__(self, message: str, exitstatus: str) -> None:
        super().__init__(message)
        self.exitstatus = exitstatus


def is_locked_error(text: str) -> bool:
    return bool(_LOCKED.search(text))


def container_tags(config: dict[str, Any]) -> set[str]:
    return {t for t in re.split(r"[;, ]+", str(config.get("tags") or "")) if t}


def disk_size_gb(rootfs: str) -> int | None:
    """The `size=` of a PVE volume string in GiB (`local-lvm:vm-101-disk-0,size=8G` → 8)."""
    match = re.search(r"size=(\d+(?:\.\d+)?)([KMGT]?)", rootfs)
    if match is None:
        return None
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1, "T": 1024, "": 1 / 1024**3}[match.group(2)]
    return int(float(match.group(1)) * scale)


class ProxmoxProvider:
    name = "proxmox"

    def __init__(self, settings: Settings, store: Store, *, lock_retries: int = 8, backoff: float = 0.5,
                 max_backoff: float = 15.0, poll_interval: float = 0.25, address_timeout: float = 120.0) -> None:
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
        self.lock_retries = lock_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.poll_interval = poll_interval
        self.address_timeout = address_timeout
        self._api = ProxmoxAPI(url.hostname, port=url.port or 8006, user=user, token_name=token_name,
                               token_value=settings.proxmox_token_secret, verify_ssl=verify,
                               timeout=settings.proxmox_timeout, backend="https", service="PVE")
        self._limiter = trio.CapacityLimiter(8)
        self._create_lock = trio.Lock()  # one create/clone at a time on this node (storage locks)

    # the API, one thread hop per call

    async def _call(self, what: str, request: Callable[[], T], *, idempotent: bool = False) -> T:
        """Run one API call; retry lock errors (and, for idempotent calls, transport failures and
        gateway errors) with exponential backoff; raise ProviderError with PVE's reason otherwise."""
        delay = self.backoff
        for attempt in range(self.lock_retries + 1):
            last = attempt == self.lock_retries
            try:
                return await trio.to_thread.run_sync(request, limiter=self._limiter)
            except ResourceException as exc:
                text = str(exc)
                if _MISSING.search(text):
                    raise ContainerMissing(f"{what}: {text}") from exc
                retry = is_locked_error(text) or (idempotent and exc.status_code in _TRANSIENT_STATUS)
                if last or not retry:
                    raise ProviderError(f"{what}: {text}") from exc
                log.info("proxmox busy, retrying", extra={"fields": {"what": what, "reason": text}})
            except requests.exceptions.SSLError as exc:
                raise ProviderError(f"{what}: TLS verification of the Proxmox API failed: {exc}") from exc
            except requests.RequestException as exc:
                if last or not idempotent:
                    raise ProviderError(f"{what}: Proxmox API unreachable: {exc}") from exc
                log.info("proxmox unreachable, retrying", extra={"fields": {"what": what, "reason": str(exc)}})
            await trio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")

    def _lxc(self, vmid: int | None = None) -> Any:
        lxc = self._api.nodes(self.node).lxc
        return lxc if vmid is None else lxc(vmid)

    async def _wait_task(self, what: str, upid: str) -> None:
        task = self._api.nodes(self.node).tasks(upid)
        interval = min(0.05, self.poll_interval)
        status: dict[str, Any] = {}
        with trio.move_on_after(self.settings.proxmox_task_timeout) as waiting:
            while True:
                status = await self._call(f"{what}: task status", task.status.get, idempotent=True)
                if status.get("status") == "stopped":
                    break
                await trio.sleep(interval)
                interval = min(interval * 2, self.poll_interval)
        if waiting.cancelled_caught:
            raise ProviderError(f"{what}: task {upid} still running after {self.settings.proxmox_task_timeout:.0f}s")
        exitstatus = str(status.get("exitstatus", ""))
        if exitstatus != "OK":
            lines = await self._call(f"{what}: task log", lambda: task.log.get(limit=50), idempotent=True)
            text = "\n".join(str(line.get("t", "")) for line in lines or [])
            raise TaskFailed(f"{what} failed: {exitstatus}\ntask log:\n{text}", exitstatus)

    async def _run_task(self, what: str, start: Callable[[], str]) -> None:
        """Start a PVE task and wait for it; a task that failed on a lock is started again."""
        delay = self.backoff
        for attempt in range(self.lock_retries + 1):
            upid = await self._call(what, start)
            try:
                await self._wait_task(what, upid)
                return
            except TaskFailed as exc:
                if attempt == self.lock_retries or not is_locked_error(exc.exitstatus):
                    raise
            await trio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    async def _current(self, vmid: int) -> dict[str, Any] | None:
        try:
            return await self._call(f"status of CT {vmid}", self._lxc(vmid).status.current.get, idempotent=True)
        except ContainerMissing:
            return None

    async def _config(self, vmid: int) -> dict[str, Any] | None:
        try:
            return await self._call(f"config of CT {vmid}", self._lxc(vmid).config.get, idempotent=True)
        except ContainerMissing:
            return None

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

    # VMIDs

    async def reserve_vmid(self, request_key: str) -> int:
        """A VMID for one provisioning request: the same on every retry of that request, never one
        another request holds, and free in PVE when reserved."""
        held = await self.store.run(edge_store.vmid_for_request, request_key)
        if held is not None:
            return held
        floor = int(await self._call("next free VMID", self._api.cluster.nextid.get, idempotent=True))
        in_pve: set[int] = set()
        for _ in range(edge_store.MAX_RESERVATION_TRIES):
            vmid = await self.store.run(edge_store.reserve_vmid, request_key, floor, frozenset(in_pve))
            try:
                await self._call(f"check VMID {vmid}", partial(self._api.cluster.nextid.get, vmid=vmid),
                                 idempotent=True)
                return vmid
            except ProviderError as exc:
                if not _EXISTS.search(str(exc)):
                    raise
            # Taken in PVE by something we did not reserve (made by hand): hold on to the next one.
            await self.store.run(edge_store.release_vmid, vmid)
            in_pve.add(vmid)
        raise ProviderError(f"no free VMID from {floor}")

    async def release_vmid(self, vmid: int) -> None:
        await self.store.run(edge_store.release_vmid, vmid)

    # the Provider interface

    def _description(self, spec: ContainerSpec) -> str:
        return f"ZLH {spec.kind} {spec.name!r} ({spec.engine_type})\n{SECRET_LINE} {spec.agent_secret}\n"

    def _settings_for(self, spec: ContainerSpec) -> dict[str, Any]:
        return {
            "hostname": spec.hostname,
            "cores": spec.cores,
            "memory": spec.memory_mb,
            "swap": self.settings.proxmox_swap_mb,
            "net0": f"name=eth0,bridge={self.settings.proxmox_bridge},ip=dhcp",
            "tags": f"{TAG};{TAG}-{spec.kind}",
            "onboot": 1,
            "description": self._description(spec),
        }

    async def create(self, spec: ContainerSpec) -> Container:
        vmid = spec.vmid
        config = await self._config(vmid)
        if config is None:
            async with self._create_lock:
                try:
                    await self._make(spec)
                except ProviderError as exc:
                    if not _EXISTS.search(str(exc)):
                        raise
                    log.info("CT already exists, adopting it", extra={"fields": {"vmid": vmid}})
            await self._wait_unlocked(vmid)
            config = await self._config(vmid)
            if config is None:
                raise ProviderError(f"CT {vmid} vanished right after it was created")
        if config.get("hostname") != spec.hostname:
            raise ProviderError(f"VMID {vmid} is held by a container ZLH did not create ({config.get('hostname')})")
        if config.get("lock"):
            await self._wait_unlocked(vmid)
        await self._call(f"configure CT {vmid}", lambda: self._lxc(vmid).config.put(**self._settings_for(spec)))
        size = disk_size_gb(str(config.get("rootfs", "")))
        if size is not None and size < spec.disk_gb:
            await self._run_task(f"resize CT {vmid}",
                                 lambda: self._lxc(vmid).resize.put(disk="rootfs", size=f"{spec.disk_gb}G"))
        await self.start(vmid)
        return Container(vmid=vmid, provider_ref=f"{self.node}/{vmid}", agent_host=await self._address(vmid),
                         agent_port=self.settings.proxmox_agent_port,
                         ide_port=self.settings.proxmox_ide_port if spec.kind == "dev" else None)

    def placement(self, spec: ContainerSpec) -> str:
        return f"{self.node}/{spec.vmid}"  # the VMID is reserved in our database before the clone

    async def find(self, vmid: int, provider_ref: str, agent_secret: str) -> Container | None:
        """The CT at the recorded VMID, if it is ours (tagged) and was made for this instance (its
        description carries this agent secret): started and returned; None if nothing is there."""
        if provider_ref != f"{self.node}/{vmid}":
            return None
        config = await self._config(vmid)
        if config is None:
            return None
        if TAG not in container_tags(config) or f"{SECRET_LINE} {agent_secret}" not in str(config.get("description", "")):
            raise ProviderError(f"VMID {vmid} is held by a container not made for this instance")
        if config.get("lock"):
            await self._wait_unlocked(vmid)
        await self.start(vmid)
        return await self.current(vmid)

    async def _make(self, spec: ContainerSpec) -> None:
        template = self.settings.proxmox_template
        if not template:
            raise ProviderError("PROXMOX_TEMPLATE is not set (a template VMID to clone or an ostemplate volume)")
        pool = self.settings.proxmox_pool or None
        if template.isdigit():
            await self._run_task(f"clone template {template} to CT {spec.vmid}", lambda: self._lxc(int(template)).clone.post(
                newid=spec.vmid, hostname=spec.hostname, full=1, storage=self.settings.proxmox_storage, pool=pool,
                description=self._description(spec)))
        else:
            await self._run_task(f"create CT {spec.vmid}", lambda: self._lxc().post(
                vmid=spec.vmid, ostemplate=template, hostname=spec.hostname, unprivileged=1, pool=pool,
                rootfs=f"{self.settings.proxmox_storage}:{spec.disk_gb}", **{
                    k: v for k, v in self._settings_for(spec).items() if k != "hostname"}))

    async def _address(self, vmid: int) -> str:
        """The container's IPv4 address on eth0, as the node reports it once DHCP has answered."""
        with trio.move_on_after(self.address_timeout):
            while True:
                interfaces = await self._call(f"interfaces of CT {vmid}", self._lxc(vmid).interfaces.get,
                                              idempotent=True)
                for interface in interfaces or []:
                    if interface.get("name") == "eth0" and interface.get("inet"):
                        return str(interface["inet"]).split("/")[0]
                await trio.sleep(self.poll_interval)
        raise ProviderError(f"CT {vmid} has no IPv4 address on eth0 after {self.address_timeout:.0f}s")

    async def current(self, vmid: int) -> Container | None:
        """The running container at `vmid` with its agent address, or None."""
        status = await self._current(vmid)
        if status is None or status.get("status") != "running":
            return None
        config = await self._config(vmid) or {}
        if TAG not in container_tags(config):
            return None
        kind = "dev" if f"{TAG}-dev" in container_tags(config) else "game"
        return Container(vmid=vmid, provider_ref=f"{self.node}/{vmid}", agent_host=await self._address(vmid),
                         agent_port=self.settings.proxmox_agent_port,
                         ide_port=self.settings.proxmox_ide_port if kind == "dev" else None)

    async def start(self, vmid: int) -> None:
        status = await self._current(vmid)
        if status is None:
            raise ProviderError(f"CT {vmid} does not exist")
        if status.get("status") == "running":
            return
        try:
            await self._run_task(f"start CT {vmid}", self._lxc(vmid).status.start.post)
        except ProviderError as exc:
            if "already running" not in str(exc):
                raise

    async def stop(self, vmid: int) -> None:
        status = await self._current(vmid)
        if status is None or status.get("status") == "stopped":
            return
        await self._run_task(f"shut down CT {vmid}",
                             lambda: self._lxc(vmid).status.shutdown.post(timeout=30, forceStop=1))

    async def status(self, vmid: int) -> str:
        current = await self._current(vmid)
        if current is None:
            return "missing"
        return "running" if current.get("status") == "running" else "stopped"

    async def destroy(self, vmid: int) -> None:
        """Stop, then purge with its unreferenced disks; a container already gone counts as destroyed."""
        try:
            current = await self._current(vmid)
            if current is not None and current.get("status") == "running":
                await self._run_task(f"stop CT {vmid}", self._lxc(vmid).status.stop.post)
            if current is not None:
                await self._run_task(f"destroy CT {vmid}", lambda: self._lxc(vmid).delete(
                    purge=1, **{"destroy-unreferenced-disks": 1}))
        except ContainerMissing:
            pass
        await self.release_vmid(vmid)

    async def list_vmids(self) -> set[int]:
        listing = await self._call("list containers", self._lxc().get, idempotent=True)
        return {int(ct["vmid"]) for ct in listing or []
                if not ct.get("template") and TAG in container_tags(ct)}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing runs in the background: each PVE task is awaited by the call that started it."""
        task_status.started()
        await trio.sleep_forever()
