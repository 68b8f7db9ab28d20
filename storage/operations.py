"""Which replica drives each operation in progress: an instance's provisioning (its provisioning
states) and an environment's create, start, stop or delete (its in-progress statuses). Synchronous;
run through Store.run.

The rule. The replica that moves a row into an in-progress state names itself in `driven_by` in the
same statement, so no other replica starts that operation. Another replica may take it over only
when it is *orphaned*: its driver is not live (no heartbeat in `cluster_replica` within the lease
TTL, database time; a replica that resigned has no row at all). Taking over is a compare-and-set on
`driven_by`, so of several replicas claiming one orphan exactly one wins. At start-up a replica also
claims its own operations (a process with its replica id drove them and is gone) and undriven ones
(`driven_by` empty: a delete that failed and waits to be asked again, or a row older than this
column); a repeated request claims those too. The periodic sweep never does: it would retry a failed
delete forever. With no TTL (one process, SQLite) every operation in progress is the caller's.

Nothing here runs an operation: it only records and answers who drives it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import peewee

from .cluster import ClusterReplica, database_now
from .environments import Environment
from .models import Instance


def _claimable(driver: peewee.Field, replica_id: str, ttl: float | None, *,
               own_and_undriven: bool) -> peewee.Expression | None:
    """Rows whose operation `replica_id` may drive (None: any row)."""
    if ttl is None:
        return None
    live = ClusterReplica.select(ClusterReplica.id).where(
        ClusterReplica.heartbeat_at > database_now() - timedelta(seconds=ttl))
    orphaned = (driver != replica_id) & driver.not_in(live)
    if own_and_undriven:
        return orphaned | driver.is_null() | (driver == replica_id)
    return orphaned


def _claim(state: peewee.Field, states: Sequence[str], replica_id: str, ttl: float | None, *,
           own_and_undriven: bool) -> list[Any]:
    model = state.model
    query = model.select().where(state.in_(states))
    claimable = _claimable(model.driven_by, replica_id, ttl, own_and_undriven=own_and_undriven)
    if claimable is not None:
        query = query.where(claimable)
    claimed = []
    for row in query.order_by(model.created_at):
        unchanged = model.driven_by.is_null() if row.driven_by is None else model.driven_by == row.driven_by
        if model.update(driven_by=replica_id).where(
                (model.id == row.id) & state.in_(states) & unchanged).execute():
            row.driven_by = replica_id
            claimed.append(row)
    return claimed


def claim_provisionings(states: Sequence[str], replica_id: str, ttl: float | None, *,
                        own_and_undriven: bool) -> list[int]:
    """Ids of the instances in `states` whose provisioning `replica_id` drives from now on."""
    return [row.id for row in _claim(Instance.state, states, replica_id, ttl, own_and_undriven=own_and_undriven)]


def claim_environment_operations(statuses: Sequence[str], replica_id: str, ttl: float | None, *,
                                 own_and_undriven: bool) -> list[Environment]:
    """The environments in `statuses` whose operation `replica_id` drives from now on."""
    return _claim(Environment.status, statuses, replica_id, ttl, own_and_undriven=own_and_undriven)


def claim_environment(environment_id: str, status: str, replica_id: str, ttl: float | None) -> bool:
    """Drive the operation of one environment in `status` (a repeated request): only if nobody
    live drives it, or this replica already does."""
    query = Environment.update(driven_by=replica_id).where(
        (Environment.id == environment_id) & (Environment.status == status))
    claimable = _claimable(Environment.driven_by, replica_id, ttl, own_and_undriven=True)
    if claimable is not None:
        query = query.where(claimable)
    return bool(query.execute())
