"""`zlh-gateway users …` against a running gateway's admin API (control/accounts.py, built separately):
list, disable (the user can no longer log in), enable, role, delete. Runs once those routes exist."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import trio

from control.app import control_routes
from tests.control.process import GatewayProcess, process_env

ADMIN_ROUTES = {("GET", "/api/admin/users"), ("POST", "/api/admin/users/<int:user_id>/disable")}
pytestmark = pytest.mark.skipif(
    not ADMIN_ROUTES <= {(r.method, r.path) for r in control_routes()},
    reason="the accounts admin API (GET /api/admin/users, …) has not landed on this branch")


async def test_users_commands_manage_accounts_through_the_admin_api(tmp_path: Path, database_url: str) -> None:
    env = process_env(tmp_path / "data", database_url, ZLH_ADMIN_EMAIL="root@example.com",
                      ZLH_ADMIN_PASSWORD="admin-password-1")
    await trio.run_process([sys.executable, "-m", "control", "create-admin", "--email", "root@example.com"],
                           env=env, cwd=tmp_path, capture_stdout=True)
    gateway = GatewayProcess(tmp_path / "data", env)
    await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            registered = await client.post("/api/auth/register", json={"email": "u@example.com",
                                                                        "password": "password123"})
            user_id = registered.json()["user"]["id"]

            async def login_status() -> int:
                response = await client.post("/api/auth/login", json={"email": "u@example.com",
                                                                       "password": "password123"})
                return response.status_code

            listed = await gateway.cli("users")
            rows = listed.get("users", listed) if isinstance(listed, dict) else listed
            assert {"root@example.com", "u@example.com"} <= {r["email"] for r in rows}
            await gateway.cli("users", "disable", str(user_id))
            assert await login_status() in (401, 403)
            await gateway.cli("users", "enable", str(user_id))
            assert await login_status() == 200
            await gateway.cli("users", "role", str(user_id), "admin")
            listed = await gateway.cli("users", "--search", "u@example.com")
            rows = listed.get("users", listed) if isinstance(listed, dict) else listed
            assert [r["role"] for r in rows if r["email"] == "u@example.com"] == ["admin"]
            await gateway.cli("users", "delete", str(user_id))
            assert await login_status() in (401, 403)
    finally:
        await gateway.stop()
