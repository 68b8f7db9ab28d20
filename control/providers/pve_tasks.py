"""One PVE node's API as the Proxmox provider uses it: calls through proxmoxer in worker threads, and
PVE tasks with PVE's own success rule. No decisions about containers live here (control/providers/
proxmox.py makes those); this module must never retry a call that changes something unless PVE said
it did not happen.

- A call runs in a worker thread (bounded by a CapacityLimiter, bounded in time by the per-call
  timeout requests enforces). Lock errors ("CT is locked", "can't lock file … got timeout") are retried
  with backoff; idempotent calls also retry transport failures and gateway errors. A transport failure
  on a call that changes something raises `CallUnanswered`: PVE may have carried it out (PVE waits up to
  10 s for a config lock before it answers), so the caller must find out what happened before deciding.
- A task succeeded when its exit status is `OK` or `WARNINGS: n` (pve-common `upid_status_is_error`);
  the warnings are handed back to the caller to keep. Anything else is `TaskFailed` with the task log.
  `Tasks.blocking_status` (time.sleep) is never used: tasks are polled with trio.sleep.
- `find_task` reads `GET /nodes/{node}/tasks` (by `vmid` and `typefilter`, `source=all`): how a caller
  learns whether a call that went unanswered started a task, and how it ended."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import requests
import trio
from proxmoxer import ProxmoxAPI, ResourceException

from .base import ProviderError

log = logging.getLogger("zlh.proxmox")

T = TypeVar("T")

_LOCKED = re.compile(r"is locked|can't lock file|got timeout", re.IGNORECASE)
_MISSING = re.compile(r"does not exist", re.IGNORECASE)
_WARNINGS = re.compile(r"WARNINGS: \d+")
_TRANSIENT_STATUS = {502, 503, 504, 596}


class ContainerMissing(ProviderError):
    pass


class CallUnanswered(ProviderError):
    """A call that changes something got no answer (timeout, dropped connection): it may have happened."""


class TaskFailed(ProviderError):
    def __init__(self, message: str, exitstatus: str) -> None:
        super().__init__(message)
        self.exitstatus = exitstatus


@dataclass(frozen=True)
class TaskOutcome:
    """A task that succeeded: `OK`, or `WARNINGS: n` with the lines that warned."""

    upid: str
    exitstatus: str
    warnings: tuple[str, ...] = ()


def is_locked_error(text: str) -> bool:
    return bool(_LOCKED.search(text))


def task_status_is_error(exitstatus: str) -> bool:
    """pve-common's upid_status_is_error: `OK` and `WARNINGS: n` succeed, anything else (an error
    message, `unexpected status`, nothing) failed."""
    return not (exitstatus == "OK" or _WARNINGS.fullmatch(exitstatus))


def warning_lines(lines: list[str]) -> tuple[str, ...]:
    """The lines of a task log that warned (PVE prefixes them `WARN:`); the whole tail if none does."""
    warned = tuple(line for line in lines if line.startswith("WARN"))
    return warned or tuple(lines[-10:])


class PveNode:
    def __init__(self, api: ProxmoxAPI, node: str, *, user: str, task_timeout: float, lock_retries: int,
                 backoff: float, max_backoff: float, poll_interval: float) -> None:
        self.api = api
        self.node = node
        self.user = user  # the token id tasks are filed under (user@realm!token)
        self.task_timeout = task_timeout
        self.lock_retries = lock_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.poll_interval = poll_interval
        self._limiter = trio.CapacityLimiter(8)

    def lxc(self, vmid: int | None = None) -> Any:
        lxc = self.api.nodes(self.node).lxc
        return lxc if vmid is None else lxc(vmid)

    async def call(self, what: str, request: Callable[[], T], *, idempotent: bool = False) -> T:
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
                if not idempotent:
                    raise CallUnanswered(f"{what}: no answer from the Proxmox API: {exc}") from exc
                if last:
                    raise ProviderError(f"{what}: Proxmox API unreachable: {exc}") from exc
                log.info("proxmox unreachable, retrying", extra={"fields": {"what": what, "reason": str(exc)}})
            await trio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")

    async def task_log(self, what: str, upid: str) -> list[str]:
        task = self.api.nodes(self.node).tasks(upid)
        lines = await self.call(f"{what}: task log", partial(task.log.get, limit=50), idempotent=True)
        return [str(line.get("t", "")) for line in lines or []]

    async def wait_task(self, what: str, upid: str) -> TaskOutcome:
        task = self.api.nodes(self.node).tasks(upid)
        interval = min(0.05, self.poll_interval)
        status: dict[str, Any] = {}
        with trio.move_on_after(self.task_timeout) as waiting:
            while True:
                status = await self.call(f"{what}: task status", task.status.get, idempotent=True)
                if status.get("status") == "stopped":
                    break
                await trio.sleep(interval)
                interval = min(interval * 2, self.poll_interval)
        if waiting.cancelled_caught:
            raise ProviderError(f"{what}: task {upid} still running after {self.task_timeout:.0f}s")
        return await self.outcome(what, upid, str(status.get("exitstatus", "")))

    async def outcome(self, what: str, upid: str, exitstatus: str) -> TaskOutcome:
        """The ended task's result by PVE's rule: TaskOutcome, or TaskFailed with the task log."""
        if exitstatus == "OK":
            return TaskOutcome(upid, exitstatus)
        lines = await self.task_log(what, upid)
        if not task_status_is_error(exitstatus):
            return TaskOutcome(upid, exitstatus, warning_lines(lines))
        text = "\n".join(lines)
        raise TaskFailed(f"{what} failed: {exitstatus}\ntask log:\n{text}", exitstatus)

    async def run_task(self, what: str, start: Callable[[], str]) -> TaskOutcome:
        """Start a PVE task and wait for it; a task that failed on a lock is started again."""
        delay = self.backoff
        for attempt in range(self.lock_retries + 1):
            upid = await self.call(what, start)
            try:
                return await self.wait_task(what, upid)
            except TaskFailed as exc:
                if attempt == self.lock_retries or not is_locked_error(exc.exitstatus):
                    raise
            await trio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")

    async def find_task(self, kind: str, vmid: int, since: float) -> dict[str, Any] | None:
        """The newest task of type `kind` filed under `vmid`, started by us at or after `since` (epoch
        seconds), running or ended; None if PVE has none. (A clone is filed under its *source* VMID.)"""
        listing = await self.call(f"tasks of {vmid}", partial(
            self.api.nodes(self.node).tasks.get, vmid=vmid, typefilter=kind, source="all", limit=50),
            idempotent=True)
        ours = [task for task in listing or []
                if task.get("user") == self.user and int(task.get("starttime", 0)) >= int(since) - 1]
        return max(ours, key=lambda task: int(task.get("starttime", 0)), default=None)
