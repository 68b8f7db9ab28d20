"""What the operator CLI reads and the few things it changes (control/cli.py): the fleet's servers
with their agents' freshness, replicas and slot leases, the edge outbox. Plain dicts, JSON-ready."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from .clock import utcnow
from .cluster import LEADER, ClusterReplica, ClusterSlot, database_now, lease_holder
from .edge import EdgeOutbox
from .instances import server_rows
from .models import Instance, User


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"


def servers(late_after: float) -> list[dict[str, Any]]:
    """Every server with its agent: `fresh` when the last successful poll is younger than `late_after` s."""
    owners = {u.id: u.email for u in User.select(User.id, User.email)}
    now = utcnow()
    result = []
    for instance, agent in server_rows(None):
        seen = agent.last_seen_at if agent is not None else None
        result.append({
            "id": instance.id, "vmid": instance.vmid, "kind": instance.kind, "name": instance.name,
            "owner": owners.get(instance.owner_id), "state": instance.state,
            "serverState": agent.server_state if agent else None,
            "alive": bool(agent and agent.alive), "ready": bool(agent and agent.ready),
            "lastSeenAt": _iso(seen), "polledAt": _iso(agent.polled_at if agent else None),
            "lastError": agent.last_error if agent else None,
            "fresh": seen is not None and (now - seen).total_seconds() < late_after,
        })
    return result


def instance_vmids() -> dict[int, dict[str, Any]]:
    return {row.vmid: {"id": row.id, "state": row.state, "name": row.name}
            for row in Instance.select(Instance.id, Instance.vmid, Instance.state, Instance.name)}


def replicas(lease_ttl: float) -> dict[str, Any]:
    """Replicas (live or not, with their heartbeat age), slot leases by holder, and the fleet leader."""
    now = database_now()
    held: dict[str | None, list[int]] = {}
    for slot in ClusterSlot.select().order_by(ClusterSlot.slot):
        holder = slot.holder if slot.holder is not None and slot.expires_at > now else None
        held.setdefault(holder, []).append(slot.slot)
    rows = []
    for replica in ClusterReplica.select().order_by(ClusterReplica.id):
        age = (now - replica.heartbeat_at).total_seconds()
        rows.append({"id": replica.id, "address": replica.address, "startedAt": _iso(replica.started_at),
                     "heartbeatAgeSeconds": round(age, 3), "live": age < lease_ttl,
                     "draining": bool(replica.draining),
                     "slots": held.get(replica.id, [])})
    return {"replicas": rows, "leader": lease_holder(LEADER), "unheldSlots": held.get(None, []),
            "slotCount": sum(len(v) for v in held.values())}


def outbox(failed_only: bool = False) -> list[dict[str, Any]]:
    query = EdgeOutbox.select().order_by(EdgeOutbox.id)
    if failed_only:
        query = query.where(EdgeOutbox.attempts > 0)
    return [{"id": row.id, "target": row.target, "key": row.key, "action": row.action, "attempts": row.attempts,
             "dueAt": _iso(row.due_at), "lastError": row.last_error} for row in query]


def retry_outbox(change_id: int | None) -> int:
    """Make failed changes (one, or every one that failed) due now; the count made due."""
    query = EdgeOutbox.update(due_at=utcnow() - timedelta(seconds=1), updated_at=utcnow())
    condition = EdgeOutbox.attempts > 0 if change_id is None else EdgeOutbox.id == change_id
    return int(query.where(condition).execute())


def outbox_backlog() -> dict[str, int]:
    """Pending changes and the ones that failed at least once (for /metrics)."""
    pending = EdgeOutbox.select().count()
    failing = EdgeOutbox.select().where(EdgeOutbox.attempts > 0).count()
    return {"pending": pending, "failing": failing}


def slots_held_by(replica_id: str) -> int:
    now = database_now()
    return int(ClusterSlot.select().where((ClusterSlot.holder == replica_id) & (ClusterSlot.expires_at > now)).count())
