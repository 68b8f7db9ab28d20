"""The agent's one notion of wall-clock time on the wire: ISO 8601 UTC with milliseconds and `Z`.

Durations and timeouts use `trio.current_time()`; this module is only for timestamps that leave the
agent. It must never be used to measure intervals.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


def iso_utc(timestamp: float | None = None) -> str:
    """`timestamp` (seconds since the epoch, default now) as `2026-11-24T04:52:00.123Z`."""
    moment = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
