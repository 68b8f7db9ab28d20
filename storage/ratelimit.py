"""Fixed-window rate-limit counters, kept in the database so every replica shares them."""

from __future__ import annotations

from datetime import timedelta

from .clock import utcnow
from .models import RateLimitBucket


def hit(key: str, limit: int, window_seconds: int) -> int:
    """Count one attempt under `key`; return 0 when allowed, else seconds until the window resets."""
    now = utcnow()
    window = timedelta(seconds=window_seconds)
    bucket = RateLimitBucket.get_or_none(RateLimitBucket.key == key)
    if bucket is None:
        RateLimitBucket.insert(key=key, window_start=now, count=1).on_conflict(
            conflict_target=[RateLimitBucket.key],
            update={RateLimitBucket.count: RateLimitBucket.count + 1},
        ).execute()
        return 0
    if bucket.window_start + window <= now:
        RateLimitBucket.update(window_start=now, count=1).where(RateLimitBucket.key == key).execute()
        return 0
    if bucket.count >= limit:
        return max(1, int((bucket.window_start + window - now).total_seconds()) + 1)
    RateLimitBucket.update(count=RateLimitBucket.count + 1).where(RateLimitBucket.key == key).execute()
    return 0
