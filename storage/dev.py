"""IDE connection activity of dev instances, for idle auto-stop (synchronous; run through Store.run).

Each gateway replica reports, per dev instance, how many IDE websockets it holds open and when it
last proxied a request for it: one row per (instance, replica), written in batches by the replica's
activity recorder. A replica that stops reporting (it died) stops counting after `live_after`, so a
crashed replica never keeps an instance awake. Nothing here talks to the network."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import peewee

from .clock import utcnow
from .models import BaseModel


class DevActivity(BaseModel):
    instance_id = peewee.IntegerField()
    replica = peewee.CharField(max_length=64)
    open_websockets = peewee.IntegerField(default=0)
    last_request_at = peewee.DateTimeField(null=True)
    updated_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        primary_key = peewee.CompositeKey("instance_id", "replica")


DEV_MODELS: list[type[BaseModel]] = [DevActivity]


@dataclass(frozen=True)
class ActivityReport:
    """What one replica knows about one instance right now."""

    instance_id: int
    open_websockets: int
    last_request_at: datetime | None


@dataclass(frozen=True)
class IdeActivity:
    """An instance's IDE activity across live replicas."""

    open_websockets: int
    last_request_at: datetime | None


def record_ide_activity(replica: str, reports: list[ActivityReport]) -> None:
    """Upsert this replica's rows; a report without a last request keeps the stored one."""
    now = utcnow()
    for report in reports:
        (DevActivity
         .insert(instance_id=report.instance_id, replica=replica, open_websockets=report.open_websockets,
                 last_request_at=report.last_request_at, updated_at=now)
         .on_conflict(conflict_target=[DevActivity.instance_id, DevActivity.replica],
                      update={DevActivity.open_websockets: report.open_websockets,
                              DevActivity.last_request_at: peewee.fn.COALESCE(
                                  report.last_request_at, DevActivity.last_request_at),
                              DevActivity.updated_at: now})
         .execute())


def ide_activity(instance_id: int, live_after: datetime) -> IdeActivity:
    """Open websockets summed over replicas that reported since `live_after`; the last request seen
    by any replica, live or not (it is a fact about the past)."""
    rows = list(DevActivity.select().where(DevActivity.instance_id == instance_id))
    open_websockets = sum(r.open_websockets for r in rows if r.updated_at >= live_after)
    seen = [r.last_request_at for r in rows if r.last_request_at is not None]
    return IdeActivity(open_websockets, max(seen) if seen else None)


def forget_ide_activity(instance_id: int) -> None:
    DevActivity.delete().where(DevActivity.instance_id == instance_id).execute()
