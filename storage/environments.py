"""Dev environments (the `/api/v1/environments` API): rows, status moves and activity reports
(synchronous; run them through Store.run).

An environment is a user's view of one dev container (an Instance of kind `dev`): its requested
resources, its status in the environment lifecycle (see control/environments.py for the transition
table), the per-workspace secrets sealed by the control layer (this module only ever sees the sealed
text), and the activity the workspace supervisor last reported. Status moves are compare-and-set on
the current status, so two replicas (or a user and the idle auto-stop) never both move one
environment. Nothing here talks to the network or opens a secret."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import peewee

from .clock import utcnow
from .dev import DevActivity, IdeActivity
from .models import BaseModel, User


class Environment(BaseModel):
    id = peewee.CharField(primary_key=True, max_length=32)  # env-<hex>
    owner = peewee.ForeignKeyField(User, on_delete="RESTRICT", backref="environments")
    owner_id: int  # the key column peewee adds beside `owner`
    instance_id = peewee.IntegerField(null=True, index=True)  # its dev container; None once deleted
    name = peewee.CharField(max_length=128)
    cloud_provider = peewee.CharField(max_length=8)
    cloud_region = peewee.CharField(max_length=64)
    cpu_cores = peewee.IntegerField()
    memory_gb = peewee.IntegerField()
    storage_gb = peewee.IntegerField()
    base_image = peewee.CharField(max_length=256)
    sealed_secrets = peewee.TextField(null=True)  # AES-GCM text; never a plaintext
    status = peewee.CharField(max_length=16, index=True)
    status_reason = peewee.TextField(null=True)
    # The replica driving the operation an in-progress status names (storage/operations.py).
    driven_by = peewee.CharField(null=True, max_length=128)
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(default=utcnow)
    # When the environment last became RUNNING: the idle clock never starts before it.
    running_since = peewee.DateTimeField(null=True)
    # The workspace supervisor's latest report (POST …/activity).
    reported_at = peewee.DateTimeField(null=True)  # the report's own timestamp
    report_received_at = peewee.DateTimeField(null=True)
    last_ide_activity = peewee.DateTimeField(null=True)
    last_ssh_activity = peewee.DateTimeField(null=True)
    active_ide_connections = peewee.IntegerField(default=0)
    active_ssh_connections = peewee.IntegerField(default=0)

    class Meta:
        indexes = ((("owner", "created_at"), False),)


ENVIRONMENT_MODELS: list[type[BaseModel]] = [Environment]


@dataclass(frozen=True)
class ActivitySnapshot:
    last_ide_activity: datetime | None
    last_ssh_activity: datetime | None
    active_ide_connections: int
    active_ssh_connections: int


def create_environment(**fields: Any) -> Environment:
    return Environment.create(**fields)


def get_environment(environment_id: str) -> Environment | None:
    return Environment.get_or_none(Environment.id == environment_id)


def environment_page(owner_id: int, page: int, page_size: int) -> tuple[list[Environment], int]:
    """One page of an owner's environments, oldest first, and how many there are in all."""
    query = Environment.select().where(Environment.owner == owner_id)
    total = query.count()
    rows = list(query.order_by(Environment.created_at, Environment.id).paginate(page, page_size))
    return rows, total


def environments_in_states(states: list[str]) -> list[Environment]:
    return list(Environment.select().where(Environment.status.in_(states)).order_by(Environment.created_at))


def move_environment(environment_id: str, expected: str, status: str, **fields: Any) -> bool:
    """Set `status` (and `fields`) only if the status is still `expected`; False if it was not."""
    fields.update(status=status, updated_at=utcnow())
    moved = (Environment.update(**fields)
             .where((Environment.id == environment_id) & (Environment.status == expected))
             .execute())
    return bool(moved)


def record_activity(environment_id: str, snapshot: ActivitySnapshot, reported_at: datetime) -> Environment | None:
    """Keep the supervisor's latest report (what it says counts as activity, not the report itself:
    a supervisor reporting "no connections" must not keep an environment awake)."""
    Environment.update(
        reported_at=reported_at, report_received_at=utcnow(),
        last_ide_activity=snapshot.last_ide_activity, last_ssh_activity=snapshot.last_ssh_activity,
        active_ide_connections=snapshot.active_ide_connections,
        active_ssh_connections=snapshot.active_ssh_connections,
    ).where(Environment.id == environment_id).execute()
    return get_environment(environment_id)


def ide_activity_of(instance_ids: list[int], live_after: datetime) -> dict[int, IdeActivity]:
    """The IDE proxy's record per instance (see storage/dev.py): open websockets on replicas that
    reported since `live_after`, and the last proxied request seen by any replica."""
    found: dict[int, IdeActivity] = {}
    if not instance_ids:
        return found
    for row in DevActivity.select().where(DevActivity.instance_id.in_(instance_ids)):
        known = found.get(row.instance_id, IdeActivity(0, None))
        open_now = row.open_websockets if row.updated_at >= live_after else 0
        seen = [t for t in (known.last_request_at, row.last_request_at) if t is not None]
        found[row.instance_id] = IdeActivity(known.open_websockets + open_now, max(seen) if seen else None)
    return found


def environment_with_ide_activity(environment_id: str, live_after: datetime) -> tuple[Environment, IdeActivity] | None:
    environment = get_environment(environment_id)
    if environment is None:
        return None
    ids = [environment.instance_id] if environment.instance_id is not None else []
    return environment, ide_activity_of(ids, live_after).get(environment.instance_id or 0, IdeActivity(0, None))


def running_with_ide_activity(status: str, live_after: datetime) -> list[tuple[Environment, IdeActivity]]:
    """Every environment in `status` with its IDE activity: what one idle auto-stop round decides on."""
    rows = environments_in_states([status])
    activity = ide_activity_of([r.instance_id for r in rows if r.instance_id is not None], live_after)
    return [(r, activity.get(r.instance_id or 0, IdeActivity(0, None))) for r in rows]


def delete_environment(environment_id: str) -> None:
    Environment.delete().where(Environment.id == environment_id).execute()
