"""Container instances and their normalized agent state: reads and writes (synchronous; run them
through Store.run). The poller is the only writer of AgentState."""

from __future__ import annotations

import json
from collections import namedtuple
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import peewee

from .clock import utcnow
from .db import is_postgres
from .models import AgentState, Instance, InstanceArchive

FIRST_VMID = 1000


class VmidTaken(Exception):
    pass


def next_free_vmid() -> int:
    """One past the highest VMID ever used here, live or archived (a VMID is never reused)."""
    live = Instance.select(peewee.fn.MAX(Instance.vmid)).scalar() or 0
    archived = InstanceArchive.select(peewee.fn.MAX(InstanceArchive.vmid)).scalar() or 0
    return max(FIRST_VMID - 1, live, archived) + 1


def create_instance(**fields: Any) -> Instance:
    try:
        with Instance._meta.database.atomic():
            instance = Instance.create(**fields)
            AgentState.create(instance=instance)
            return instance
    except peewee.IntegrityError as exc:
        raise VmidTaken(fields.get("vmid")) from exc


def get_instance(instance_id: int) -> Instance | None:
    return Instance.get_or_none(Instance.id == instance_id)


def instance_by_vmid(vmid: int) -> Instance | None:
    return Instance.get_or_none(Instance.vmid == vmid)


def list_instances(owner_id: int | None) -> list[Instance]:
    query = Instance.select().order_by(Instance.id)
    if owner_id is not None:
        query = query.where(Instance.owner == owner_id)
    return list(query)


def count_by_kind(owner_id: int, kind: str) -> int:
    return Instance.select().where((Instance.owner == owner_id) & (Instance.kind == kind)
                                   & (Instance.state != "failed")).count()


def update_instance(instance_id: int, **fields: Any) -> None:
    fields["updated_at"] = utcnow()
    Instance.update(**fields).where(Instance.id == instance_id).execute()


def move_instance_vmid(instance_id: int, old_vmid: int, new_vmid: int) -> bool:
    """Give an instance another VMID (its own was found taken outside the gateway). False when the
    instance no longer holds `old_vmid`, or `new_vmid` is held by another instance or was used before
    (archived): a VMID is never shared or reused."""
    if InstanceArchive.select().where(InstanceArchive.vmid == new_vmid).exists():
        return False
    try:
        with Instance._meta.database.atomic():
            query = Instance.update(vmid=new_vmid, updated_at=utcnow()).where(
                (Instance.id == instance_id) & (Instance.vmid == old_vmid))
            return bool(query.execute())
    except peewee.IntegrityError:
        return False


def move_instance(instance_id: int, expected_state: str, **fields: Any) -> bool:
    """Update the row only if it is still in `expected_state` (compare-and-set): False when another
    actor (a delete, another replica) moved it first."""
    fields["updated_at"] = utcnow()
    query = Instance.update(**fields).where((Instance.id == instance_id) & (Instance.state == expected_state))
    return bool(query.execute())


def record_made(instance_id: int, expected_state: str, expected_ref: str | None, **fields: Any) -> bool:
    """Record what a provisioning step made (container identity, agent address) only if the row is
    still in `expected_state` and names `expected_ref` as its container: a driver never overwrites
    what another recorded meanwhile (False then)."""
    fields["updated_at"] = utcnow()
    ref = Instance.provider_ref.is_null() if expected_ref is None else Instance.provider_ref == expected_ref
    query = Instance.update(**fields).where((Instance.id == instance_id) & (Instance.state == expected_state) & ref)
    return bool(query.execute())


def provider_refs(provider: str) -> dict[int, str | None]:
    """vmid → recorded container identity of every instance row of `provider` (what the database says
    exists; a container it does not name is an orphan)."""
    return {row.vmid: row.provider_ref for row in
            Instance.select(Instance.vmid, Instance.provider_ref).where(Instance.provider == provider)}


def instances_in_states(states: list[str]) -> list[Instance]:
    return list(Instance.select().where(Instance.state.in_(states)).order_by(Instance.id))


def claim_power_action(instance_id: int, action: str, hold_seconds: int) -> bool:
    """Take the server's one power-action slot; False if another action holds it."""
    now = utcnow()
    claimed = (
        Instance.update(power_action=action, power_until=now + timedelta(seconds=hold_seconds))
        .where((Instance.id == instance_id)
               & (Instance.power_action.is_null() | (Instance.power_until <= now)))
        .execute()
    )
    return bool(claimed)


def release_power_action(instance_id: int) -> None:
    Instance.update(power_action=None, power_until=None).where(Instance.id == instance_id).execute()


def archive_and_delete(instance_id: int, reason: str) -> InstanceArchive | None:
    """Archive metadata from the instance's current fields (payload, engineType, allocatedPorts),
    then delete the row and its agent state."""
    instance = Instance.get_or_none(Instance.id == instance_id)
    if instance is None:
        return None
    archive = InstanceArchive.create(
        instance_id=instance.id, vmid=instance.vmid, owner_id=instance.owner_id, kind=instance.kind,
        name=instance.name, engine_type=instance.engine_type, payload=instance.payload,
        allocated_ports=instance.allocated_ports, final_state=instance.state, reason=reason,
        created_at=instance.created_at,
    )
    AgentState.delete().where(AgentState.instance == instance.id).execute()
    instance.delete_instance()
    return archive


def archive_orphan(vmid: int, reason: str) -> InstanceArchive:
    """A container with no row: record that it existed and was removed."""
    return InstanceArchive.create(vmid=vmid, reason=reason, final_state="orphan")


# --- normalized agent state -------------------------------------------------------------------


@dataclass(frozen=True)
class PollTarget:
    instance_id: int
    host: str
    port: int
    secret: str


@dataclass
class PollResult:
    instance_id: int
    alive: bool
    ready: bool
    checked_at: datetime
    error: str | None = None
    status: dict[str, Any] | None = None
    details: dict[str, Any] | None = None  # version / update / players at the slow cadence


POLLED_STATES = ("ready", "awaiting_ready", "publishing")


def poll_targets() -> list[PollTarget]:
    return poll_targets_where(None)


@dataclass(frozen=True)
class PollFreshness:
    """How fresh the poller's view is, as stored: what the Portal would read."""

    oldest: datetime | None  # the least recent last poll (None when no agent was polled)
    late: list[int]  # instances never polled, not alive, or last polled before the cutoff
    never: int
    dead: int


def poll_freshness(cutoff: datetime) -> PollFreshness:
    """One aggregate and one narrow query, for watching thousands of agents every second (reading
    whole server rows for that cost a sixth of a core at 10,000 agents)."""
    oldest = AgentState.select(peewee.fn.MIN(AgentState.polled_at)).scalar()
    rows: Any = (AgentState.select(AgentState.instance, AgentState.polled_at, AgentState.alive)
            .where(AgentState.polled_at.is_null() | (AgentState.polled_at < cutoff) | ~AgentState.alive)
            .tuples())
    late, never, dead = [], 0, 0
    for instance_id, polled_at, alive in rows:
        late.append(instance_id)
        never += polled_at is None
        dead += polled_at is not None and not alive
    return PollFreshness(oldest, late, never, dead)


def poll_targets_where(condition: Any | None) -> list[PollTarget]:
    """Pollable agents (matching `condition`, an Instance expression), in id order: a stable order keeps
    each agent at the same point of every round, so the time between its polls stays one interval."""
    where = Instance.state.in_(POLLED_STATES) & Instance.agent_port.is_null(False)
    rows: Any = (Instance.select(Instance.id, Instance.agent_host, Instance.agent_port, Instance.agent_secret)
            .where(where if condition is None else where & condition)
            .order_by(Instance.id).tuples())
    return [PollTarget(*row) for row in rows]


_RECORD_POLL = """UPDATE agent_state SET alive = {p}, ready = {p}, ready_checked_at = {p}, polled_at = {p},
    last_error = {p}, last_seen_at = COALESCE({p}, last_seen_at),
    failures = CASE WHEN {p} THEN 0 ELSE failures + 1 END,
    server_state = CASE WHEN {p} THEN {p} ELSE server_state END,
    resources = CASE WHEN {p} THEN {p} ELSE resources END,
    version = CASE WHEN {p} THEN {p} ELSE version END,
    players = COALESCE({p}, players), operations = COALESCE({p}, operations),
    update_available = COALESCE({p}, update_available)
    WHERE instance_id = {p}"""


def _poll_row(result: PollResult) -> tuple[Any, ...]:
    """The parameters of `_RECORD_POLL` for one result: what the agent did not report keeps its value."""
    status, details = result.status, result.details or {}
    has_status = status is not None
    status = status or {}
    players = status.get("players") or [] if has_status else None
    players = details.get("players", players)
    has_version = "version" in details or "version" in status
    version = details["version"] if "version" in details else status.get("version")
    update = details["updateAvailable"] if "updateAvailable" in details else status.get("updateAvailable")
    has_update = "updateAvailable" in details or "updateAvailable" in status
    return (
        result.alive, result.ready, result.checked_at, result.checked_at, result.error,
        result.checked_at if result.alive else None,
        result.alive,
        has_status, status.get("state"),
        has_status, _json(status.get("resources")),
        has_version, version,
        _json(players), _json(status.get("operations") or []) if has_status else None,
        bool(update) if has_update else None,
        result.instance_id,
    )


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def record_polls(results: list[PollResult]) -> None:
    """Write one batch of poll results: one statement executed for the whole batch, in one transaction
    (a peewee UPDATE per result cost more CPU than the poll itself at thousands of agents)."""
    database = AgentState._meta.database
    sql = _RECORD_POLL.format(p=database.param)
    rows = [_poll_row(result) for result in results]
    cursor = database.cursor()
    if is_postgres(database):
        from psycopg2.extras import execute_batch  # imported here: only PostgreSQL needs it

        execute_batch(cursor, sql, rows, page_size=250)
    else:
        cursor.executemany(sql, rows)


_INSTANCE_COLUMNS = ("id", "vmid", "kind", "name", "engine_type", "state", "state_reason", "allocated_ports",
                     "owner_id")
_AGENT_COLUMNS = ("alive", "ready", "last_seen_at", "ready_checked_at", "last_error", "server_state", "players",
                  "version", "update_available", "operations", "resources", "polled_at")
_MOMENT_COLUMNS = frozenset({"last_seen_at", "ready_checked_at", "polled_at"})
PortalInstance: Any = namedtuple("PortalInstance", _INSTANCE_COLUMNS)  # type: ignore[misc]
PortalAgent: Any = namedtuple("PortalAgent", _AGENT_COLUMNS)  # type: ignore[misc]
_SPLIT = len(_INSTANCE_COLUMNS)


def _moment(value: Any) -> datetime | None:
    """A timestamp as the driver returned it: a datetime from psycopg2, ISO text from sqlite3
    (`fromisoformat` is ~20x cheaper than peewee's strptime loop)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


_PORTAL_SQL: dict[tuple[Any, ...], str] = {}


def _portal_sql(database: Any, shape: tuple[bool, bool, bool, bool]) -> str:
    """The listing's SQL for one combination of filters, built by peewee once per database kind and
    reused (building it cost as much as running it). Parameters: owner, id, after, limit, as present."""
    key = (type(database), database.param, *shape)
    if key not in _PORTAL_SQL:
        fields = [getattr(Instance, "owner" if c == "owner_id" else c) for c in _INSTANCE_COLUMNS]
        fields += [getattr(AgentState, c) for c in _AGENT_COLUMNS]
        query = Instance.select(*fields).join(AgentState, peewee.JOIN.LEFT_OUTER).order_by(Instance.id)
        by_owner, by_id, after, limit = shape
        if by_owner:
            query = query.where(Instance.owner == 0)
        if by_id:
            query = query.where(Instance.id == 0)
        if after:
            query = query.where(Instance.id > 0)
        if limit:
            query = query.limit(1)
        _PORTAL_SQL[key] = query.sql()[0]
    return _PORTAL_SQL[key]


def portal_rows(owner_id: int | None, instance_id: int | None = None, *, after_id: int | None = None,
                limit: int | None = None) -> list[tuple[Any, Any]]:
    """(instance, agent state) pairs for the Portal's server views, in id order, as read-only named
    tuples straight from the cursor: the hot read path. The JSON columns (allocatedPorts, players,
    operations, resources) stay the stored JSON text, so a listing embeds them in its answer without
    decoding and re-encoding each row. Measured at 100 servers: decoding was a third of the query's CPU;
    peewee's query building, row wrapping and strptime most of the rest, so the SQL is built once and
    the rows come from `fetchall`. `after_id`/`limit` page by id (keyset: stable while servers are added,
    one index range scan at any depth)."""
    database = Instance._meta.database
    filters = (owner_id, instance_id, after_id, limit)
    sql = _portal_sql(database, tuple(value is not None for value in filters))  # type: ignore[arg-type]
    cursor = database.execute_sql(sql, [value for value in filters if value is not None])
    rows: list[tuple[Any, Any]] = []
    for row in cursor.fetchall():
        instance = PortalInstance._make(row[:_SPLIT])
        if row[_SPLIT] is None:  # no agent_state row (LEFT JOIN): alive is NOT NULL in the table
            rows.append((instance, None))
            continue
        (alive, ready, last_seen_at, ready_checked_at, last_error, server_state, players, version, update_available,
         operations, resources, polled_at) = row[_SPLIT:]
        rows.append((instance, PortalAgent(  # type: ignore[call-arg]  # fields from _AGENT_COLUMNS
            bool(alive), bool(ready), _moment(last_seen_at), _moment(ready_checked_at), last_error, server_state,
            players, version, bool(update_available), operations, resources, _moment(polled_at))))
    return rows


def server_rows(owner_id: int | None, instance_id: int | None = None) -> list[tuple[Any, Any]]:
    """`portal_rows` with the JSON columns decoded, for callers that read them (restore progress)."""
    decoded = []
    for instance, agent in portal_rows(owner_id, instance_id):
        instance = instance._replace(allocated_ports=_loads(instance.allocated_ports))
        if agent is not None:
            agent = agent._replace(players=_loads(agent.players), operations=_loads(agent.operations),
                                   resources=_loads(agent.resources))
        decoded.append((instance, agent))
    return decoded


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)
