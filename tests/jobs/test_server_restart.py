"""`POST /api/v1/server/restart` for real: the gateway process (started here as `python -m control
run`, as an operator would) answers 202, then drains and exits cleanly so its service manager can
start the current release. In-process tests only use dry_run: this one owns the process it stops."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import trio

from control.auth.tokens import TokenKind, TokenService
from tests.conftest import TEST_SECRET


async def test_restart_stops_the_gateway_gracefully(tmp_path: Path) -> None:
    env = {**os.environ, "ZLH_DATA_DIR": str(tmp_path / "data"), "JWT_SECRET": TEST_SECRET,
           "ZLH_ARGON2_TIME_COST": "1", "ZLH_ARGON2_MEMORY_KIB": "64", "ZLH_ARGON2_PARALLELISM": "1",
           "DATABASE_URL": f"sqlite:///{tmp_path}/gateway.db", "ZLH_PROVIDER": "local"}
    root = Path(__file__).resolve().parents[2]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(partial(
            trio.run_process, [sys.executable, "-m", "control", "run", "--port", "0"], cwd=root, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False))
        try:
            printed = b""
            with trio.fail_after(30):
                while b"listening on" not in printed:
                    printed += await process.stdout.receive_some(4096)
                while b"\n" not in printed.split(b"listening on", 1)[1]:
                    printed += await process.stdout.receive_some(4096)
            url = re.search(rb"listening on (\S+)", printed).group(1).decode()
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                user = (await client.post("/api/auth/register", json={"email": "root@example.com",
                                                                      "password": "password123"})).json()["user"]
                admin = TokenService(TEST_SECRET, "zlh-gateway").issue(TokenKind.ACCESS, user["id"], 600, role="admin")
                answer = await client.post("/api/v1/server/restart", json={},
                                           headers={"authorization": f"Bearer {admin}"})
                assert answer.status_code == 202 and answer.json()["restarting"] is True
            with trio.fail_after(30):
                async for _ in process.stdout:  # drain until the process closes its output
                    pass
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
