"""Test fixtures: every database-touching test runs against SQLite and PostgreSQL (a throwaway
cluster started once per session), and `gateway` starts the real app on a real socket (port 0)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from control.app import run_gateway
from control.config import Settings
from storage.db import connect_database
from storage.migrations import migrate
from tests.pgcluster import PgCluster

DATABASES = [d for d in os.environ.get("ZLH_TEST_DATABASES", "sqlite,postgresql").split(",") if d]
TEST_SECRET = "test-signing-key-" + "k" * 40


def _migrate_template(url: str) -> None:
    db = connect_database(url)
    migrate(db)
    db.close_all()  # a template must have no open connections to be cloned


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster()
    cluster.start()
    try:
        cluster.create_template(_migrate_template)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/zlh.db"
    return request.getfixturevalue("pg_cluster").fresh_database()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings.from_env(
        env={},
        data_dir=tmp_path / "data",
        database_url=database_url,
        jwt_secret=TEST_SECRET,
        argon2_time_cost=1,  # cheap hashing keeps the suite fast; the parameters, not the cost, are tested
        argon2_memory_kib=64,
        argon2_parallelism=1,
        bind=["127.0.0.1:0"],
        hypercorn_config=Path(__file__).parent.parent / "hypercorn.toml",
        poll_interval=0.5,
        ready_timeout=30.0,
        local_stop_agents_on_exit=True,
    )


@dataclass
class Gateway:
    url: str
    settings: Settings
    shutdown: trio.Event
    client: httpx.AsyncClient

    async def register(self, email: str = "user@example.com", password: str = "password123") -> dict:
        response = await self.client.post("/api/auth/register", json={"email": email, "password": password})
        assert response.status_code == 201, response.text
        return response.json()

    @staticmethod
    def bearer(session: dict) -> dict[str, str]:
        return {"authorization": f"Bearer {session['accessToken']}"}

    async def wait_for(self, predicate, path: str, session: dict, timeout: float = 30.0) -> dict:  # type: ignore[no-untyped-def]
        """Poll a JSON GET until `predicate(body)` holds; the last body otherwise (assert on it)."""
        body: dict = {}
        with trio.move_on_after(timeout):
            while True:
                response = await self.client.get(path, headers=self.bearer(session))
                body = response.json()
                if predicate(body):
                    return body
                await trio.sleep(0.1)
        raise AssertionError(f"timed out waiting on {path}: last answer {body}")

    async def provision(self, session: dict, kind: str = "game", name: str = "srv", **payload: object) -> dict:
        """Provision through the API and wait until the server is ready."""
        response = await self.client.post("/api/instances", headers=self.bearer(session), json={
            "kind": kind, "name": name, "engineType": "minecraft" if kind == "game" else "vscode",
            "payload": payload})
        assert response.status_code == 202, response.text
        instance = response.json()
        await self.wait_for(lambda b: b.get("instanceState") == "ready" and b.get("agentReady"),
                            f"/api/servers/{instance['id']}", session)
        return instance


@pytest.fixture
async def gateway(nursery: trio.Nursery, settings: Settings) -> AsyncIterator[Gateway]:
    shutdown = trio.Event()
    binds = await nursery.start(partial(run_gateway, settings, shutdown))
    async with httpx.AsyncClient(base_url=binds[0], timeout=30) as client:
        yield Gateway(binds[0], settings, shutdown, client)
    shutdown.set()
