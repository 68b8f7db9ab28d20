"""Dev environments API v1 on the real gateway: helpers to call it, to wait on an environment's
status, and to reach the gateway's database the way the gateway does (one transaction per unit)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
import trio

from control.config import Settings
from storage.db import database
from tests.conftest import Gateway

T = TypeVar("T")
BASE = "/api/v1/environments"
GOOD = {"name": "my-dev-environment", "cloudProvider": "AZURE", "cloudRegion": "eastus", "baseImage": "node"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Idle auto-stop on, with a short timeout the tests move the clock past; rounds run only when a
    test shortens the interval."""
    settings.environment_idle_timeout = 60.0
    settings.environment_idle_check_interval = 3600.0
    settings.environment_action_wait = 30.0
    return settings


async def in_db(work: Callable[..., T], *args: Any) -> T:
    """Run storage work against the running gateway's database, in one transaction."""
    db = database.obj

    def unit() -> T:
        with db.connection_context(), db.atomic():
            return work(*args)

    return await trio.to_thread.run_sync(unit)


@dataclass
class Environments:
    gateway: Gateway

    @property
    def client(self) -> httpx.AsyncClient:
        return self.gateway.client

    def auth(self, session: dict | None) -> dict[str, str]:
        return self.gateway.bearer(session) if session else {}

    async def create(self, session: dict | None, **fields: Any) -> httpx.Response:
        return await self.client.post(BASE, json={**GOOD, **fields}, headers=self.auth(session))

    async def get(self, session: dict | None, environment_id: str) -> httpx.Response:
        return await self.client.get(f"{BASE}/{environment_id}", headers=self.auth(session))

    async def action(self, session: dict | None, environment_id: str, action: str, **kwargs: Any) -> httpx.Response:
        return await self.client.post(f"{BASE}/{environment_id}/{action}", headers=self.auth(session), **kwargs)

    async def delete(self, session: dict | None, environment_id: str) -> httpx.Response:
        return await self.client.delete(f"{BASE}/{environment_id}", headers=self.auth(session))

    async def wait_status(self, session: dict, environment_id: str, status: str, timeout: float = 40.0) -> dict:
        body: dict = {}
        with trio.move_on_after(timeout):
            while True:
                response = await self.get(session, environment_id)
                body = response.json().get("environment", {})
                if body.get("status") == status:
                    return body
                if body.get("status") == "ERROR" and status != "ERROR":
                    break
                await trio.sleep(0.1)
        raise AssertionError(f"environment {environment_id} never reached {status}: {body}")


@pytest.fixture
async def envs(gateway: Gateway) -> Environments:
    return Environments(gateway)


def seed_error(response: httpx.Response, status: int, code: str) -> str:
    """Assert the seed's error shape; the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message"} and body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    return str(body["message"])
