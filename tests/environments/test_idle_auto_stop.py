"""One idle auto-stop round (`stop_idle_environments`) over a real database with a fake clock and a
recording stop action: what counts as activity, what does not, and that only RUNNING environments
past their deadline are stopped, each once, with the reason."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import trio

from control.environments import stop_idle_environments
from storage import clock, users
from storage import dev as store_dev
from storage import environments as store_env
from storage.db import Store, connect_database
from storage.environments import ActivitySnapshot, Environment
from storage.migrations import migrate

TIMEOUT = 600.0
LIVE_WINDOW = 15.0


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = Store(connect_database(database_url))
    await trio.to_thread.run_sync(migrate, store.db)
    yield store
    store.close()


class RecordingStop:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, environment: Environment, reason: str) -> None:
        self.calls.append((environment.id, reason))


async def make(store: Store, environment_id: str, status: str = "RUNNING", instance_id: int | None = None,
               **fields: Any) -> None:
    def create() -> None:
        owner = users.user_by_email("idle@example.com") or users.create_user("idle@example.com", "x")
        now = clock.utcnow()
        store_env.create_environment(
            id=environment_id, owner=owner.id, instance_id=instance_id, name=environment_id, cloud_provider="AZURE",
            cloud_region="eastus", cpu_cores=2, memory_gb=4, storage_gb=20, base_image="node", status=status,
            created_at=now, running_since=now, **fields)

    await store.run(create)


async def round_(store: Store, stop: RecordingStop) -> list[str]:
    return await stop_idle_environments(store, stop, idle_timeout=TIMEOUT, ide_live_window=LIVE_WINDOW)


def advance(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    monkeypatch.setattr(clock, "offset", clock.offset + timedelta(seconds=seconds))


async def test_quiet_running_environment_stops_once_past_its_deadline(store: Store,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    stop = RecordingStop()
    await make(store, "env-quiet")
    await make(store, "env-stopped", status="STOPPED")
    await make(store, "env-creating", status="CREATING")
    advance(monkeypatch, TIMEOUT - 1)
    assert await round_(store, stop) == []
    advance(monkeypatch, 2)
    assert await round_(store, stop) == ["env-quiet"]
    assert stop.calls[0][1].startswith("auto-stopped: idle for 10 min (no IDE or SSH connection, no activity since ")
    assert await stop_idle_environments(store, stop, idle_timeout=0, ide_live_window=LIVE_WINDOW) == []


async def test_reported_activity_keeps_it_awake_until_it_is_old(store: Store,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    stop = RecordingStop()
    await make(store, "env-ide")
    await make(store, "env-connected")
    await make(store, "env-quiet-report")
    advance(monkeypatch, 300)
    now = clock.utcnow()
    await store.run(store_env.record_activity, "env-ide", ActivitySnapshot(now, None, 0, 0), now)
    await store.run(store_env.record_activity, "env-connected", ActivitySnapshot(None, None, 0, 2), now)
    # A report that says nothing happened is not activity: the report itself must not keep it awake.
    await store.run(store_env.record_activity, "env-quiet-report",
                    ActivitySnapshot(now - timedelta(hours=3), now - timedelta(hours=2), 0, 0), now)
    advance(monkeypatch, TIMEOUT - 299)
    assert await round_(store, stop) == ["env-quiet-report"]
    advance(monkeypatch, 300)
    assert sorted(await round_(store, stop)) == ["env-connected", "env-ide", "env-quiet-report"]


async def test_ide_proxy_activity_counts_from_live_replicas(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    stop = RecordingStop()
    await make(store, "env-websocket", instance_id=11)
    await make(store, "env-dead-replica", instance_id=12)
    await make(store, "env-request", instance_id=13)
    await store.run(store_dev.record_ide_activity, "replica-a",
                    [store_dev.ActivityReport(12, 1, None), store_dev.ActivityReport(13, 0, None)])
    advance(monkeypatch, TIMEOUT / 2)
    await store.run(store_dev.record_ide_activity, "replica-b", [store_dev.ActivityReport(13, 0, clock.utcnow())])
    advance(monkeypatch, TIMEOUT / 2 + 1)
    # replica-a stopped reporting long ago: its open websocket no longer counts.
    await store.run(store_dev.record_ide_activity, "replica-b", [store_dev.ActivityReport(11, 1, None)])
    assert await round_(store, stop) == ["env-dead-replica"]
    advance(monkeypatch, TIMEOUT / 2)  # the last proxied request of env-request is now too old
    await store.run(store_dev.record_ide_activity, "replica-b", [store_dev.ActivityReport(11, 1, None)])
    assert sorted(await round_(store, stop)) == ["env-dead-replica", "env-request"]
    advance(monkeypatch, LIVE_WINDOW + 1)  # replica-b went quiet: its websocket no longer counts either
    assert "env-websocket" in await round_(store, stop)


async def test_status_moves_are_compare_and_set(store: Store) -> None:
    await make(store, "env-cas")
    assert await store.run(store_env.move_environment, "env-cas", "RUNNING", "STOPPING", status_reason="idle")
    assert not await store.run(store_env.move_environment, "env-cas", "RUNNING", "STOPPING")
    environment = await store.run(store_env.get_environment, "env-cas")
    assert environment is not None and (environment.status, environment.status_reason) == ("STOPPING", "idle")
