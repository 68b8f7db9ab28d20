"""Edge state: VMID reservations for the Proxmox provider, what is published for each instance, and
the durable publishing outbox (synchronous; run these through Store.run).

The outbox holds one *desired* change per (target, key): enqueueing again replaces the pending action
and bumps its version, so a publish followed by an unpublish never runs out of order and a retried
delivery applies the newest wish exactly once in effect (every action is idempotent at the target).
Rows are claimed with a lease by a conditional update, so several replicas share the work without
applying one row twice at the same time. Nothing here talks to the network."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import peewee

from .clock import utcnow
from .models import BaseModel, JSONField


class VmidReservation(BaseModel):
    """A VMID held for one provisioning request, so concurrent creates never pick the same one."""

    vmid = peewee.IntegerField(primary_key=True)
    request_key = peewee.CharField(unique=True, max_length=128)
    reserved_at = peewee.DateTimeField(default=utcnow)


class EdgeEntry(BaseModel):
    """One published instance, as it was published (service discovery and Velocity render from these)."""

    instance_id = peewee.IntegerField(primary_key=True)
    record = JSONField()
    published_at = peewee.DateTimeField(default=utcnow)


class EdgeOutbox(BaseModel):
    id = peewee.AutoField()
    target = peewee.CharField(max_length=32)  # dns | velocity
    key = peewee.CharField(max_length=128)  # instance:<id>, or one key for a whole rendered file
    action = peewee.CharField(max_length=16)  # publish | unpublish
    record = JSONField()
    version = peewee.IntegerField(default=1)
    attempts = peewee.IntegerField(default=0)
    due_at = peewee.DateTimeField(index=True)
    claimed_until = peewee.DateTimeField(null=True)
    last_error = peewee.TextField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("target", "key"), True),)


EDGE_MODELS: list[type[BaseModel]] = [VmidReservation, EdgeEntry, EdgeOutbox]

MAX_RESERVATION_TRIES = 200


# VMID reservations


def vmid_for_request(request_key: str) -> int | None:
    row = VmidReservation.get_or_none(VmidReservation.request_key == request_key)
    return None if row is None else row.vmid


def reserve_vmid(request_key: str, floor: int, skip: frozenset[int] = frozenset()) -> int:
    """The VMID held for `request_key`, or the lowest free one ≥ `floor` not in `skip`, now held.
    A concurrent reservation of the same VMID loses on the primary key and moves on to the next."""
    db = VmidReservation._meta.database
    # Write first: on SQLite the first write takes the write lock, so concurrent reservations wait
    # their turn (busy_timeout) instead of failing to upgrade a read lock ("database is locked").
    VmidReservation.update(reserved_at=utcnow()).where(VmidReservation.request_key == request_key).execute()
    candidate = floor
    for _ in range(MAX_RESERVATION_TRIES):
        held = vmid_for_request(request_key)
        if held is not None:
            return held
        taken = {
            row.vmid
            for row in VmidReservation.select(VmidReservation.vmid).where(
                VmidReservation.vmid >= candidate, VmidReservation.vmid < candidate + MAX_RESERVATION_TRIES
            )
        }
        while candidate in taken or candidate in skip:
            candidate += 1
        try:
            with db.atomic():
                VmidReservation.create(vmid=candidate, request_key=request_key, reserved_at=utcnow())
            return candidate
        except peewee.IntegrityError:
            continue
    raise RuntimeError(f"no free VMID found from {floor} after {MAX_RESERVATION_TRIES} tries")


def release_vmid(vmid: int) -> None:
    VmidReservation.delete().where(VmidReservation.vmid == vmid).execute()


# Published entries


def published_records() -> list[dict[str, Any]]:
    return [row.record for row in EdgeEntry.select().order_by(EdgeEntry.instance_id)]


def published_record(instance_id: int) -> dict[str, Any] | None:
    row = EdgeEntry.get_or_none(EdgeEntry.instance_id == instance_id)
    return None if row is None else row.record


# The outbox


@dataclass(frozen=True)
class OutboxChange:
    target: str
    key: str
    action: str
    record: dict[str, Any]


@dataclass(frozen=True)
class ClaimedChange:
    id: int
    target: str
    key: str
    action: str
    record: dict[str, Any]
    version: int
    attempts: int


def _enqueue(change: OutboxChange, now: datetime) -> None:
    row = EdgeOutbox.get_or_none((EdgeOutbox.target == change.target) & (EdgeOutbox.key == change.key))
    if row is None:
        EdgeOutbox.create(target=change.target, key=change.key, action=change.action, record=change.record,
                          due_at=now, created_at=now, updated_at=now)
        return
    # A newer wish replaces the pending one; the version bump tells an in-flight delivery that its
    # row changed underneath it, so it keeps the row instead of deleting it.
    EdgeOutbox.update(action=change.action, record=change.record, version=EdgeOutbox.version + 1,
                      attempts=0, due_at=now, last_error=None, updated_at=now).where(
        EdgeOutbox.id == row.id).execute()


def record_publication(instance_id: int, record: dict[str, Any], changes: list[OutboxChange]) -> None:
    """Mark the instance published and enqueue its changes, in the caller's one transaction."""
    now = utcnow()
    EdgeEntry.insert(instance_id=instance_id, record=record, published_at=now).on_conflict(
        conflict_target=[EdgeEntry.instance_id], update={EdgeEntry.record: record, EdgeEntry.published_at: now}
    ).execute()
    for change in changes:
        _enqueue(change, now)


def record_unpublication(instance_id: int, fallback: dict[str, Any],
                         changes_for: Callable[[dict[str, Any]], list[OutboxChange]]) -> dict[str, Any]:
    """Forget the instance and enqueue the changes `changes_for(record)` names for what was published
    (or for `fallback` if nothing was); returns that record."""
    now = utcnow()
    gone = list(EdgeEntry.delete().where(EdgeEntry.instance_id == instance_id).returning(EdgeEntry.record).execute())
    record = gone[0].record if gone else fallback
    for change in changes_for(record):
        _enqueue(change, now)
    return record


def claim_due(lease_seconds: float, limit: int, keys: list[tuple[str, str]] | None = None) -> list[ClaimedChange]:
    """Lease up to `limit` due, unclaimed rows (only those named by `keys`, if given)."""
    now = utcnow()
    # Releasing lapsed leases is also the first write (see reserve_vmid on SQLite write locks).
    EdgeOutbox.update(claimed_until=None).where(EdgeOutbox.claimed_until < now).execute()
    free = EdgeOutbox.claimed_until.is_null()
    query = EdgeOutbox.select().where((EdgeOutbox.due_at <= now) & free)
    if keys is not None:
        if not keys:
            return []
        wanted = functools.reduce(
            operator.or_, [(EdgeOutbox.target == t) & (EdgeOutbox.key == k) for t, k in keys])
        query = query.where(wanted)
    claimed = []
    until = now + timedelta(seconds=lease_seconds)
    for row in query.order_by(EdgeOutbox.due_at, EdgeOutbox.id).limit(limit):
        won = EdgeOutbox.update(claimed_until=until).where(
            (EdgeOutbox.id == row.id) & (EdgeOutbox.version == row.version) & free).execute()
        if won:
            claimed.append(ClaimedChange(row.id, row.target, row.key, row.action, row.record, row.version,
                                         row.attempts))
    return claimed


def complete(change_id: int, version: int) -> None:
    """Delivered: drop the row unless a newer wish replaced it meanwhile (then release it)."""
    gone = EdgeOutbox.delete().where((EdgeOutbox.id == change_id) & (EdgeOutbox.version == version)).execute()
    if not gone:
        EdgeOutbox.update(claimed_until=None).where(EdgeOutbox.id == change_id).execute()


def postpone(change_id: int, version: int, error: str, delay_seconds: float) -> None:
    """Failed: try again after `delay_seconds`, keeping the error for status pages."""
    now = utcnow()
    EdgeOutbox.update(attempts=EdgeOutbox.attempts + 1, last_error=error[:2000], claimed_until=None,
                      due_at=now + timedelta(seconds=delay_seconds), updated_at=now).where(
        (EdgeOutbox.id == change_id) & (EdgeOutbox.version == version)).execute()
    EdgeOutbox.update(claimed_until=None).where(
        (EdgeOutbox.id == change_id) & (EdgeOutbox.version != version)).execute()


def pending_changes() -> list[dict[str, Any]]:
    return [
        {"target": row.target, "key": row.key, "action": row.action, "attempts": row.attempts,
         "dueAt": row.due_at, "lastError": row.last_error}
        for row in EdgeOutbox.select().order_by(EdgeOutbox.id)
    ]


def next_due_at() -> datetime | None:
    row = EdgeOutbox.select(EdgeOutbox.due_at).order_by(EdgeOutbox.due_at).first()
    return None if row is None else row.due_at
