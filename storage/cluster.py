"""Scale-out coordination through the database: the replica registry, partition (slot) leases for the
poller, named leases for once-per-fleet work, and cross-replica notifications. No consensus of our
own: every decision is a conditional UPDATE in one transaction, so PostgreSQL serializes them.

Theory of operation. Agents are split into `slot_count` slots (`instance_id % slot_count`). Each live
replica calls `heartbeat` every heartbeat interval; in one transaction it
  1. stamps its row in `cluster_replica` (live = stamped within the lease TTL),
  2. works out its fair share of slots from the sorted live set (the first `slot_count % n` replicas
     get one more), so every replica computes the same shares from the same rows,
  3. gives back slots above its share (holder cleared, expiry kept: nobody may take a slot before the
     expiry its last holder promised, so a slot handed over is never polled twice at once),
  4. renews the slots it still holds, and claims lapsed slots (expiry passed) up to its share,
  5. renews or claims the named fleet-leader lease the same way.
A replica that dies stops renewing; its slots lapse after the TTL and the next heartbeat of another
replica claims them. Every time here is the database's clock (`now()` on PostgreSQL), so replicas on
different hosts never compare their own clocks.

This module never decides what a replica polls or runs: it only records and answers."""

from __future__ import annotations

import random
import select
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import peewee

from .clock import utcnow
from .db import database, is_postgres
from .instances import PollTarget, poll_targets_where
from .models import BaseModel, Instance

CHANNEL = "zlh_cluster"
LEADER = "fleet-leader"
FORGET_AFTER = timedelta(hours=1)  # replica rows silent this long are deleted
NEVER = datetime(1970, 1, 1)


class ClusterReplica(BaseModel):
    id = peewee.CharField(primary_key=True, max_length=128)
    address = peewee.CharField(null=True, max_length=256)
    started_at = peewee.DateTimeField()
    heartbeat_at = peewee.DateTimeField(index=True)
    draining = peewee.BooleanField(default=False)  # alive, but takes no slots and does not lead (drain)


class ClusterSlot(BaseModel):
    """One partition of the agents: polled by `holder` until `expires_at` (database time)."""

    slot = peewee.IntegerField(primary_key=True)
    holder = peewee.CharField(null=True, max_length=128, index=True)
    expires_at = peewee.DateTimeField(default=NEVER)


class ClusterLease(BaseModel):
    """A named lease for work that must run once across the fleet."""

    name = peewee.CharField(primary_key=True, max_length=64)
    holder = peewee.CharField(null=True, max_length=128)
    expires_at = peewee.DateTimeField(default=NEVER)


TABLES = [ClusterReplica, ClusterSlot, ClusterLease]


@dataclass(frozen=True)
class ClusterView:
    """What one heartbeat leaves this replica holding."""

    now: datetime  # database time of the heartbeat
    live: list[str]  # sorted ids of live replicas (this one included)
    slots: frozenset[int]
    leader: bool
    claimed: frozenset[int]  # slots newly claimed by this heartbeat


def database_now() -> datetime:
    """The coordination clock: PostgreSQL's transaction time, else (SQLite, one process) utcnow()."""
    if is_postgres(database):
        row = database.execute_sql("SELECT now() AT TIME ZONE 'UTC'").fetchone()
        return row[0]  # type: ignore[no-any-return]
    return utcnow()


def fair_share(replica_id: str, live: list[str], slot_count: int) -> int:
    """Slots this replica should hold when `live` (sorted) are the live replicas."""
    if replica_id not in live:
        return 0
    base, extra = divmod(slot_count, len(live))
    return base + (1 if live.index(replica_id) < extra else 0)


def heartbeat(replica_id: str, address: str | None, *, ttl: float, slot_count: int,
              lead: bool = True, draining: bool = False) -> ClusterView:
    """One heartbeat (see the module docstring). Run it in one transaction (Store.run). A draining
    replica stays registered but is not among the live replicas the slots are split over, gives its
    slots back and gives up the fleet lead."""
    now = database_now()
    expires = now + timedelta(seconds=ttl)
    _ensure_slots(slot_count)
    updated = (ClusterReplica.update(heartbeat_at=now, address=address, draining=draining)
               .where(ClusterReplica.id == replica_id).execute())
    if not updated:
        ClusterReplica.insert(id=replica_id, address=address, started_at=now, heartbeat_at=now,
                              draining=draining).on_conflict_ignore().execute()
    ClusterReplica.delete().where(ClusterReplica.heartbeat_at < now - FORGET_AFTER).execute()
    live = sorted(r.id for r in ClusterReplica.select(ClusterReplica.id)
                  .where((ClusterReplica.heartbeat_at > now - timedelta(seconds=ttl)) & ~ClusterReplica.draining))
    if draining:
        ClusterSlot.update(holder=None, expires_at=now).where(ClusterSlot.holder == replica_id).execute()
        ClusterLease.update(holder=None, expires_at=now).where(
            (ClusterLease.name == LEADER) & (ClusterLease.holder == replica_id)).execute()
        return ClusterView(now, live, frozenset(), False, frozenset())
    share = fair_share(replica_id, live, slot_count)
    held = sorted(s.slot for s in ClusterSlot.select(ClusterSlot.slot).where(
        (ClusterSlot.holder == replica_id) & (ClusterSlot.slot < slot_count)))
    if len(held) > share:
        excess = held[share:]
        ClusterSlot.update(holder=None).where(ClusterSlot.slot.in_(excess)
                                              & (ClusterSlot.holder == replica_id)).execute()
        held = held[:share]
    if held:
        ClusterSlot.update(expires_at=expires).where(ClusterSlot.slot.in_(held)
                                                     & (ClusterSlot.holder == replica_id)).execute()
    claimed: list[int] = []
    if len(held) < share:
        lapsed = [s.slot for s in ClusterSlot.select(ClusterSlot.slot).where(
            (ClusterSlot.expires_at <= now) & (ClusterSlot.slot < slot_count))]
        # A random pick keeps replicas that claim at the same moment from contending for one row.
        wanted = random.sample(lapsed, min(len(lapsed), share - len(held)))
        for slot in wanted:
            if (ClusterSlot.update(holder=replica_id, expires_at=expires)
                    .where((ClusterSlot.slot == slot) & (ClusterSlot.expires_at <= now)).execute()):
                claimed.append(slot)
    leader = _hold_lease(LEADER, replica_id, now, expires) if lead else False
    return ClusterView(now, live, frozenset(held) | frozenset(claimed), leader, frozenset(claimed))


def _ensure_slots(slot_count: int) -> None:
    existing = ClusterSlot.select(peewee.fn.COUNT(ClusterSlot.slot)).where(ClusterSlot.slot < slot_count).scalar()
    if existing == slot_count:
        return
    rows = [{"slot": s, "holder": None, "expires_at": NEVER} for s in range(slot_count)]
    ClusterSlot.insert_many(rows).on_conflict_ignore().execute()


def _hold_lease(name: str, replica_id: str, now: datetime, expires: datetime) -> bool:
    """Renew `name` if this replica holds it, or take it if it lapsed; whether it holds it now."""
    ClusterLease.insert(name=name, holder=None, expires_at=NEVER).on_conflict_ignore().execute()
    return bool(ClusterLease.update(holder=replica_id, expires_at=expires).where(
        (ClusterLease.name == name)
        & ((ClusterLease.holder == replica_id) | (ClusterLease.expires_at <= now))).execute())


def resign(replica_id: str) -> None:
    """A replica leaving gracefully: its slots and leases are free at once, its row is gone."""
    now = database_now()
    ClusterSlot.update(holder=None, expires_at=now).where(ClusterSlot.holder == replica_id).execute()
    ClusterLease.update(holder=None, expires_at=now).where(ClusterLease.holder == replica_id).execute()
    ClusterReplica.delete().where(ClusterReplica.id == replica_id).execute()


def slot_holders() -> dict[int, str | None]:
    return {s.slot: s.holder for s in ClusterSlot.select()}


def lease_holder(name: str = LEADER) -> str | None:
    lease = ClusterLease.get_or_none(ClusterLease.name == name)
    if lease is None or lease.expires_at <= database_now():
        return None
    return lease.holder  # type: ignore[no-any-return]


def live_replicas(ttl: float) -> list[ClusterReplica]:
    since = database_now() - timedelta(seconds=ttl)
    return list(ClusterReplica.select().where(ClusterReplica.heartbeat_at > since).order_by(ClusterReplica.id))


def poll_targets_in_slots(slots: Iterable[int], slot_count: int) -> list[PollTarget]:
    """The pollable agents whose slot is in `slots`."""
    wanted = sorted(set(slots))
    if not wanted:
        return []
    # id mod slot_count, written so both databases agree (peewee's `%` means LIKE; `/` of integers
    # truncates in both)
    slot = Instance.id - (Instance.id / slot_count) * slot_count
    return poll_targets_where(slot.in_(wanted))


# --- notifications ------------------------------------------------------------------------------

def notify(payload: str, channel: str = CHANNEL) -> None:
    """Send `payload` to every listening replica when the current transaction commits (PostgreSQL
    NOTIFY; at most 8000 bytes). Nothing to do on SQLite: there is only one process."""
    if is_postgres(database):
        database.execute_sql("SELECT pg_notify(%s, %s)", (channel, payload))


class NotificationListener:
    """A dedicated autocommit PostgreSQL connection that LISTENs on one channel. Blocking: call it
    from one worker thread at a time."""

    def __init__(self, db: peewee.Database, channel: str = CHANNEL) -> None:
        self.db = db
        self.channel = channel
        self._conn: Any = None

    def open(self) -> None:
        import psycopg2

        conn = psycopg2.connect(dbname=self.db.database, **self.db.connect_params)
        conn.autocommit = True
        conn.cursor().execute(f'LISTEN "{self.channel}"')
        self._conn = conn

    def wait(self, timeout: float) -> list[str]:
        """Payloads that arrived, waiting up to `timeout` seconds for the first one."""
        conn = self._conn
        if not conn.notifies:
            readable, _, _ = select.select([conn], [], [], timeout)
            if readable:
                conn.poll()
        payloads = [n.payload for n in conn.notifies]
        conn.notifies.clear()
        return payloads

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
