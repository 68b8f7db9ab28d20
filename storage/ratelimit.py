"""Fixed-window rate-limit counters, kept in the database so every replica shares them.

One attempt is one SQL statement (an upsert that restarts a lapsed window and counts in the same
row lock), so concurrent attempts on any replica never lose a count. Keys that are long or carry
anything but printable ASCII (they include what a client typed) are stored as their SHA-256.
Buckets whose window has lapsed are deleted by `prune`, run periodically."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import peewee

from .clock import utcnow
from .models import RateLimitBucket

MAX_PLAIN_KEY = 128


def bucket_key(key: str) -> str:
    if len(key) <= MAX_PLAIN_KEY and key.isascii() and key.isprintable():
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def hit(key: str, limit: int, window_seconds: int) -> int:
    """Count one attempt under `key`; return 0 when allowed, else seconds until the window resets."""
    now = utcnow()
    window = timedelta(seconds=window_seconds)
    lapsed = RateLimitBucket.window_start <= now - window
    row = (RateLimitBucket
           .insert(key=bucket_key(key), window_start=now, count=1)
           .on_conflict(conflict_target=[RateLimitBucket.key], update={
               RateLimitBucket.count: peewee.Case(None, [(lapsed, 1)], RateLimitBucket.count + 1),
               RateLimitBucket.window_start: peewee.Case(None, [(lapsed, now)], RateLimitBucket.window_start)})
           .returning(RateLimitBucket.count, RateLimitBucket.window_start)
           .objects()
           .execute())
    bucket = next(iter(row))
    if bucket.count <= limit:
        return 0
    return max(1, int((bucket.window_start + window - now).total_seconds()) + 1)


def prune(window_seconds: int) -> int:
    """Delete the buckets whose window has lapsed; answers how many."""
    cutoff = utcnow() - timedelta(seconds=window_seconds)
    return RateLimitBucket.delete().where(RateLimitBucket.window_start <= cutoff).execute()
