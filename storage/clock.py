"""The one clock. Every timestamp the program stores or compares comes from `utcnow()`, so tests
can move time by replacing `clock.offset` instead of sleeping."""

from datetime import UTC, datetime, timedelta

offset = timedelta(0)


def utcnow() -> datetime:
    """Naive UTC (what both SQLite and PostgreSQL `timestamp` columns round-trip unchanged)."""
    return datetime.now(UTC).replace(tzinfo=None) + offset


def isoformat(moment: datetime | None) -> str | None:
    """ISO 8601 UTC with a `Z`, the wire format for every time."""
    if moment is None:
        return None
    return moment.isoformat(timespec="milliseconds") + "Z"
