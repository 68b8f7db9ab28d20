"""The durable publishing outbox worker and the publisher that feeds it.

`OutboxPublisher.publish/unpublish` record what is published and enqueue one change per target in
one transaction (storage/edge.py), then try to deliver those changes at once. Whatever could not be
delivered stays in the outbox and `Outbox.run` (a service in the app's nursery) retries it with
exponential backoff, on whichever replica claims it first. So a DNS outage delays a record but never
loses it, and since every target action is idempotent (replace / delete a whole RRset, re-render a
whole file) a retry never duplicates one. A target failure never propagates to the caller."""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from typing import Any, Protocol

import trio

from storage import edge as edge_store
from storage.db import Store
from storage.edge import ClaimedChange, OutboxChange

from . import EdgeError, PublishedInstance
from .dns import PowerDns
from .names import NamingPolicy, dns_records, is_minecraft
from .velocity import VelocityConfig

log = logging.getLogger("zlh.edge")


class EdgeTarget(Protocol):
    name: str

    def key_for(self, instance: PublishedInstance) -> str | None:
        """The outbox key of this instance's change at this target, or None if it has none."""

    async def apply(self, action: str, instance: PublishedInstance) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class DnsTarget:
    name = "dns"

    def __init__(self, dns: PowerDns, policy: NamingPolicy) -> None:
        self.dns = dns
        self.policy = policy

    def key_for(self, instance: PublishedInstance) -> str | None:
        return f"instance:{instance.instance_id}" if dns_records(instance, self.policy) else None

    async def apply(self, action: str, instance: PublishedInstance) -> None:
        records = dns_records(instance, self.policy)
        if action == "publish":
            await self.dns.replace(records)
        else:
            await self.dns.delete(records)

    def describe(self) -> dict[str, Any]:
        return {"target": "dns", "provider": "powerdns", "zone": self.dns.zone, "domain": self.policy.domain}


class VelocityTarget:
    """Every change re-renders the one file from all published instances, so one key serves all."""

    name = "velocity"

    def __init__(self, config: VelocityConfig, store: Store) -> None:
        self.config = config
        self.store = store

    def key_for(self, instance: PublishedInstance) -> str | None:
        return "config" if instance.kind == "game" and is_minecraft(instance.engine_type) else None

    async def apply(self, action: str, instance: PublishedInstance) -> None:
        records = await self.store.run(edge_store.published_records)
        await self.config.apply([PublishedInstance(**r) for r in records])

    def describe(self) -> dict[str, Any]:
        return {"target": "velocity", "config": str(self.config.path)}


class Outbox:
    def __init__(self, store: Store, targets: list[EdgeTarget], *, retry_base: float = 2.0,
                 retry_max: float = 300.0, call_timeout: float = 10.0, poll_interval: float = 2.0,
                 lease: float = 60.0) -> None:
        self.store = store
        self.targets = {t.name: t for t in targets}
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.call_timeout = call_timeout
        self.poll_interval = poll_interval
        self.lease = max(lease, call_timeout * 3)
        self._wake = trio.Event()

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after `attempts + 1` failures (exponential, capped, jittered)."""
        return min(self.retry_base * 2**attempts, self.retry_max) * random.uniform(0.8, 1.2)

    async def deliver(self, keys: list[tuple[str, str]] | None = None) -> int:
        """Deliver due changes (only those named by `keys`, if given); returns how many succeeded."""
        claimed = await self.store.run(edge_store.claim_due, self.lease, 50, keys)
        delivered = 0
        for change in claimed:
            delivered += await self._apply(change)
        return delivered

    async def _apply(self, change: ClaimedChange) -> bool:
        target = self.targets.get(change.target)
        try:
            if target is None:
                raise EdgeError(f"no {change.target!r} target is configured on this replica")
            with trio.fail_after(self.call_timeout):
                await target.apply(change.action, PublishedInstance(**change.record))
        except (EdgeError, OSError, trio.TooSlowError) as exc:
            delay = self.backoff(change.attempts)
            reason = str(exc) or type(exc).__name__
            log.warning("edge change failed, will retry", extra={"fields": {
                "target": change.target, "key": change.key, "action": change.action,
                "attempts": change.attempts + 1, "retryIn": round(delay, 1), "reason": reason}})
            await self.store.run(edge_store.postpone, change.id, change.version, reason, delay)
            return False
        await self.store.run(edge_store.complete, change.id, change.version)
        return True

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.deliver()
            with trio.move_on_after(self.poll_interval):
                await self._wake.wait()
            self._wake = trio.Event()


class OutboxPublisher:
    """The configured EdgePublisher: durable, asynchronous, retried (see the module docstring)."""

    def __init__(self, store: Store, outbox: Outbox, notes: dict[str, Any] | None = None) -> None:
        self.store = store
        self.outbox = outbox
        self.notes = notes or {}

    def _changes(self, action: str, record: dict[str, Any]) -> list[OutboxChange]:
        instance = PublishedInstance(**record)
        changes = []
        for target in self.outbox.targets.values():
            key = target.key_for(instance)
            if key is not None:
                changes.append(OutboxChange(target.name, key, action, record))
        return changes

    async def publish(self, instance: PublishedInstance) -> None:
        record = asdict(instance)
        changes = self._changes("publish", record)
        await self.store.run(edge_store.record_publication, instance.instance_id, record, changes)
        await self.outbox.deliver([(c.target, c.key) for c in changes])

    async def unpublish(self, instance: PublishedInstance) -> None:
        def changes_for(record: dict[str, Any]) -> list[OutboxChange]:
            return self._changes("unpublish", record)

        record = await self.store.run(edge_store.record_unpublication, instance.instance_id, asdict(instance),
                                      changes_for)
        await self.outbox.deliver([(c.target, c.key) for c in changes_for(record)])

    def describe(self) -> dict[str, Any]:
        return {"publisher": "outbox", "targets": [t.describe() for t in self.outbox.targets.values()],
                **self.notes}
