"""Job-backend fixtures: an operator and an admin on the real gateway, runner registration, and a
project imported from YAML. Everything goes through the HTTP API of the gateway started by
tests/conftest.py (real socket, SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from storage import clock, users
from storage.db import database
from tests.conftest import Gateway

PROJECT_YAML = """\
project:
  name: demo
  description: Demo service
  default_ref: main
pipelines:
  - name: build
    labels: [linux]
    max_attempts: 2
    env: {MODE: release}
    steps:
      - name: compile
        run: echo compiling
      - name: package
        run: echo packaging
  - name: test
    labels: [linux]
    steps:
      - name: unit
        run: echo testing
chains:
  - name: release
    pipelines: [build, test]
"""


@dataclass
class Jobs:
    gateway: Gateway
    operator: dict[str, str]
    admin: dict[str, str]

    @property
    def client(self) -> httpx.AsyncClient:
        return self.gateway.client

    async def register_runner(self, name: str = "runner", labels: list[str] | None = None,
                              shared: bool = True) -> RunnerClient:
        """A runner registered by the admin; shared by default, so it leases the operator's jobs."""
        response = await self.client.post("/api/v1/agents", json={"name": name, "labels": labels or ["linux"],
                                                                  "shared": shared}, headers=self.admin)
        assert response.status_code == 201, response.text
        body = response.json()
        return RunnerClient(self.client, body["agent"]["id"], {"authorization": f"Bearer {body['token']}"})

    async def import_project(self, text: str = PROJECT_YAML) -> dict[str, Any]:
        response = await self.client.post("/api/v1/projects/import", json={"yaml": text}, headers=self.operator)
        assert response.status_code == 201, response.text
        return response.json()

    async def run_pipeline(self, pipeline_id: int, **payload: Any) -> dict[str, Any]:
        response = await self.client.post(f"/api/v1/pipelines/{pipeline_id}/run-selection", json=payload,
                                          headers=self.operator)
        assert response.status_code == 201, response.text
        return response.json()["jobs"][0]

    async def job(self, job_id: int) -> dict[str, Any]:
        response = await self.client.get(f"/api/v1/jobs/{job_id}", headers=self.operator)
        assert response.status_code == 200, response.text
        return response.json()


@dataclass
class RunnerClient:
    client: httpx.AsyncClient
    id: str
    headers: dict[str, str]

    async def heartbeat(self, **body: Any) -> httpx.Response:
        return await self.client.post("/api/v1/heartbeat", json=body, headers=self.headers)

    async def lease(self) -> dict[str, Any]:
        response = await self.client.post("/api/v1/agent/lease", headers=self.headers)
        assert response.status_code == 200, response.text
        return response.json()

    async def status(self, job_id: int, status: str, **body: Any) -> httpx.Response:
        return await self.client.post(f"/api/v1/jobs/{job_id}/status", json={"status": status, **body},
                                      headers=self.headers)


@pytest.fixture
def moved_clock() -> Iterator[None]:
    """Tests that move storage.clock.offset get it back afterwards."""
    try:
        yield
    finally:
        clock.offset = clock.offset * 0


@pytest.fixture
async def jobs(gateway: Gateway) -> Jobs:
    session = await gateway.register("operator@example.com")
    admin_session = await gateway.register("admin@example.com")
    await make_admin(admin_session["user"]["id"])
    login = await gateway.client.post("/api/auth/login", json={"email": "admin@example.com", "password": "password123"})
    assert login.status_code == 200, login.text
    return Jobs(gateway, gateway.bearer(session), gateway.bearer(login.json()))


async def make_admin(user_id: int) -> None:
    """An admin as `make admin` makes one: the role in the database (what runner sharing reads)."""
    db = database.obj

    def unit() -> None:
        with db.connection_context(), db.atomic():
            users.set_role(user_id, "admin")

    await trio.to_thread.run_sync(unit)


@pytest.fixture
def settings(settings: Any) -> Any:
    """The shared settings, with the lease reaper passing often enough for tests to watch it work,
    an artifact cap small enough to exceed cheaply, and local repositories and loopback forges
    allowed (the tests' git repositories are directories; test_sources.py narrows this again)."""
    settings.job_reap_interval = 0.1
    settings.artifact_max_bytes = 4 * 1024 * 1024
    settings.jobs_allowed_sources = ["local", "127.0.0.0/8"]
    return settings


async def wait_for_status(jobs: Jobs, job_id: int, status: str, seconds: float = 10) -> dict[str, Any]:
    with trio.fail_after(seconds):
        while True:
            job = await jobs.job(job_id)
            if job["status"] == status:
                return job
            await trio.sleep(0.05)
