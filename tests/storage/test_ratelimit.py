"""Rate-limit counters (storage/ratelimit.py): one atomic statement per attempt, so concurrent attempts
from many threads never lose a count; a lapsed window restarts; long or odd keys fit the column;
lapsed buckets are pruned. On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
import trio

from storage import clock, ratelimit
from storage.db import Store, connect_database
from storage.migrations import migrate
from storage.models import RateLimitBucket


@pytest.fixture
async def store(database_url: str) -> Store:
    db = connect_database(database_url, max_connections=12)
    await trio.to_thread.run_sync(migrate, db)
    return Store(db, threads=8)


@pytest.fixture(autouse=True)
def restore_clock():  # type: ignore[no-untyped-def]
    yield
    clock.offset = timedelta(0)


async def test_concurrent_attempts_are_each_counted_once(store: Store) -> None:
    answers: list[int] = []

    async def attempt() -> None:
        answers.append(await store.run(ratelimit.hit, "login:ip:203.0.113.9", 10, 300))

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(attempt)
    assert answers.count(0) == 10  # exactly the limit was let through, whatever the interleaving
    assert all(0 < retry <= 301 for retry in answers if retry)
    bucket = await store.read(lambda: RateLimitBucket.get(RateLimitBucket.key == "login:ip:203.0.113.9"))
    assert bucket.count == 40


async def test_a_lapsed_window_restarts_and_is_pruned(store: Store) -> None:
    for _ in range(3):
        await store.run(ratelimit.hit, "reset:acct:a@example.com", 3, 60)
    assert await store.run(ratelimit.hit, "reset:acct:a@example.com", 3, 60) > 0
    await store.run(ratelimit.hit, "reset:acct:b@example.com", 3, 60)
    clock.offset = timedelta(seconds=61)
    assert await store.run(ratelimit.hit, "reset:acct:a@example.com", 3, 60) == 0  # a new window
    assert await store.run(ratelimit.prune, 60) == 1  # b lapsed; a's window is fresh
    keys = await store.read(lambda: [b.key for b in RateLimitBucket.select()])
    assert keys == ["reset:acct:a@example.com"]


async def test_long_and_control_character_keys_fit(store: Store) -> None:
    for key in ("login:acct:" + "x" * 400 + "@example.com", "login:acct:@\u001d.", "login:acct:\u00e9@x.io"):
        assert await store.run(ratelimit.hit, key, 1, 60) == 0
        assert await store.run(ratelimit.hit, key, 1, 60) > 0
    stored = await store.read(lambda: [b.key for b in RateLimitBucket.select()])
    assert len(stored) == 3 and all(len(key) <= 128 for key in stored)
