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
  5. renews or claims the named fleet-leader lease the same way,
  6. reports the next moment a lease it does not hold lapses (`next_lapse`), so the replica can beat
     again right then instead of up to one heartbeat later.
A replica that dies stops renewing; its slots lapse after the TTL and the next heartbeat of another
replica claims them. Every time here is the database's clock (`now()` on PostgreSQL), so replicas on
different hosts never compare their own clocks.

No deadlocks: a claim is one statement that locks lapsed rows in slot order and skips rows another
replica's claim holds (`FOR UPDATE SKIP LOCKED`), so claims never wait for each other; two replicas
claiming at once split the lapsed slots between them in the same heartbeat. Renewals and give-backs
touch only the replica's own rows and take their locks in slot order too. (Claiming row by row in a
random order deadlocked: PostgreSQL aborted one heartbeat, whose share then arrived a beat late.)

This module never decides what a replica polls or runs: it only records and answers."""

from __future__ import annotations

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
    next_lapse: datetime | None = None  # the earliest future expiry of a lease held by no one / another


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
        _update_in_order(held[share:], replica_id, holder=None)
        held = held[:share]
    if held:
        _update_in_order(held, replica_id, expires_at=expires)
    if len(held) < share:
        _claim_lapsed(replica_id, now, expires, share - len(held), slot_count)
    # What this replica holds now, as committed rows say: a lapsed slot of ours that another replica
    # claimed first is not ours any more, whatever `held` read before.
    holding = frozenset(s.slot for s in ClusterSlot.select(ClusterSlot.slot).where(
        (ClusterSlot.holder == replica_id) & (ClusterSlot.slot < slot_count)))
    leader = _hold_lease(LEADER, replica_id, now, expires) if lead else False
    return ClusterView(now, live, holding, leader, holding - frozenset(held),
                       _next_lapse(replica_id, now, slot_count, lead))


def _update_in_order(slots: list[int], replica_id: str, **fields: Any) -> None:
    """Update this replica's own `slots`, locking them in slot order (one statement)."""
    own = ClusterSlot.select(ClusterSlot.slot).where(ClusterSlot.slot.in_(slots) & (ClusterSlot.holder == replica_id))
    if is_postgres(database):
        own = own.order_by(ClusterSlot.slot).for_update()
    ClusterSlot.update(**fields).where(ClusterSlot.slot.in_(own) & (ClusterSlot.holder == replica_id)).execute()


def _claim_lapsed(replica_id: str, now: datetime, expires: datetime, wanted: int, slot_count: int) -> None:
    """Claim up to `wanted` lapsed slots in one statement that never waits for another claim."""
    lapsed = (ClusterSlot.select(ClusterSlot.slot)
              .where((ClusterSlot.expires_at <= now) & (ClusterSlot.slot < slot_count))
              .order_by(ClusterSlot.slot).limit(wanted))
    if is_postgres(database):
        lapsed = lapsed.for_update(skip_locked=True)
    ClusterSlot.update(holder=replica_id, expires_at=expires).where(
        ClusterSlot.slot.in_(lapsed) & (ClusterSlot.expires_at <= now)).execute()


def _next_lapse(replica_id: str, now: datetime, slot_count: int, lead: bool) -> datetime | None:
    """The earliest future expiry of a slot (or, when leading is wanted, the leader lease) this
    replica does not hold: when a dead or departed holder's lease becomes claimable."""
    not_mine = (ClusterSlot.holder.is_null() | (ClusterSlot.holder != replica_id))
    soonest = (ClusterSlot.select(peewee.fn.MIN(ClusterSlot.expires_at))
               .where(not_mine & (ClusterSlot.expires_at > now) & (ClusterSlot.slot < slot_count)).scalar())
    if lead:
        lease = ClusterLease.get_or_none(ClusterLease.name == LEADER)
        if lease is not None and lease.holder != replica_id and lease.expires_at > now:
            soonest = lease.expires_at if soonest is None else min(soonest, lease.expires_at)
    return soonest  # type: ignore[no-any-return]


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


class ListenerLost(Exception):
    """The LISTEN connection could not be opened or was lost."""


class NotificationListener:
    """A dedicated autocommit PostgreSQL connection that LISTENs on one channel. `open` and `close`
    block (run them in a worker thread); waiting is the caller's: wait until `fileno()` is readable
    with the event loop's own readiness wait, then `drain()`, which never blocks. (Never `select()`:
    it fails on descriptors above 1,024, which a replica holding thousands of agent connections has.)"""

    def __init__(self, db: peewee.Database, channel: str = CHANNEL) -> None:
        self.db = db
        self.channel = channel
        self._conn: Any = None

    def open(self) -> None:
        import psycopg2

        # TCP keepalives: a connection cut silently (no FIN) is noticed within about a minute instead
        # of never, since nothing else is ever sent on it (libpq ignores them on unix sockets).
        params = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                  "keepalives_count": 3, **self.db.connect_params}
        try:
            conn = psycopg2.connect(dbname=self.db.database, **params)
        except psycopg2.Error as exc:
            raise ListenerLost(str(exc).strip()) from exc
        try:
            conn.autocommit = True
            conn.cursor().execute(f'LISTEN "{self.channel}"')
        except psycopg2.Error as exc:
            conn.close()
            raise ListenerLost(str(exc).strip()) from exc
        self._conn = conn

    def fileno(self) -> int:
        return int(self._conn.fileno())

    def drain(self) -> list[str]:
        """Payloads received so far (reads what the socket holds; raises when the connection is lost)."""
        import psycopg2

        conn = self._conn
        try:
            conn.poll()
        except psycopg2.Error as exc:
            raise ListenerLost(str(exc).strip()) from exc
        payloads = [n.payload for n in conn.notifies]
        conn.notifies.clear()
        return payloads

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
