"""IDE sessions across replicas, with a real agent and its stand-in IDE: logging out on one replica
ends the IDE sessions opened from that login on every replica at once — the IDE websocket another
replica holds is cut (a cross-replica event; the proxy's own re-check comes only every 30 s) and the
session's cookie is refused there — while a session of another login of the same user goes on."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from bench.harness import AgentRow
from tests.cluster.helpers import PASSWORD, bearer, cluster, insert_agents, real_agent, register
from tests.conftest import DATABASES

pytestmark = pytest.mark.skipif("postgresql" not in DATABASES, reason="scale-out runs on PostgreSQL only")


async def ide_cookie(http: httpx.AsyncClient, url: str, session: dict[str, Any], instance_id: int) -> str:
    """An IDE session cookie (`name=value`) traded on `url` for a link token of `session`."""
    token = await http.post(f"{url}/api/dev/{instance_id}/ide-token", headers=bearer(session))
    assert token.status_code == 200, token.text
    traded = await http.get(f"{url}/__ide/{instance_id}/?token={token.json()['token']}")
    assert traded.status_code == 302, traded.text
    return traded.headers["set-cookie"].split(";")[0]


@asynccontextmanager
async def ide_websocket(url: str, instance_id: int, cookie: str) -> AsyncIterator[WebSocketConnection]:
    host = url.removeprefix("http://")
    async with open_websocket_url(f"ws://{host}/__ide/{instance_id}/", extra_headers=[
            (b"origin", url.encode()), (b"cookie", cookie.encode())]) as ws:
        assert json.loads(await ws.get_message())["path"] == "/"  # the stand-in IDE's hello
        yield ws


async def page(http: httpx.AsyncClient, url: str, instance_id: int, cookie: str) -> httpx.Response:
    return await http.get(f"{url}/__ide/{instance_id}/", headers={"cookie": cookie})


async def test_logout_on_one_replica_cuts_that_logins_ide_websocket_on_another(
        pg_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = pg_cluster.fresh_database()
    async with real_agent(tmp_path) as agent, cluster(url, tmp_path) as replicas, \
            httpx.AsyncClient(timeout=10) as http:
        origin, holder = await replicas.start("r1", "r2")
        leaving = await register(http, origin.url, "dev@example.com")
        staying = (await http.post(f"{origin.url}/api/auth/login", json={"email": "dev@example.com",
                                                                         "password": PASSWORD})).json()
        [instance_id] = await insert_agents(url, leaving["user"]["id"],
                                            [AgentRow("dev", agent["port"], agent["secret"], agent["idePort"])], "ws")
        started = await http.post(f"{holder.url}/api/dev/{instance_id}/codeserver/start", headers=bearer(leaving))
        assert started.status_code == 200, started.text
        leaving_cookie = await ide_cookie(http, holder.url, leaving, instance_id)
        staying_cookie = await ide_cookie(http, holder.url, staying, instance_id)

        with trio.fail_after(30):
            async with ide_websocket(holder.url, instance_id, leaving_cookie) as cut, \
                    ide_websocket(holder.url, instance_id, staying_cookie) as kept:
                await cut.send_message("before")
                assert await cut.get_message() == "before"
                revoked = trio.current_time()
                logout = await http.post(f"{origin.url}/api/auth/logout",
                                         json={"refreshToken": leaving["refreshToken"]})
                assert logout.status_code == 204, logout.text
                with trio.fail_after(10), pytest.raises(ConnectionClosed):
                    await cut.get_message()
                elapsed = trio.current_time() - revoked
                await kept.send_message("after")
                assert await kept.get_message() == "after"
        print(f"\nlogout on {origin.name} cut the IDE websocket on {holder.name} after {elapsed:.2f}s")
        assert elapsed < 5

        for replica in (holder, origin):
            refused = await page(http, replica.url, instance_id, leaving_cookie)
            assert refused.status_code == 401 and refused.json()["error"] == "SESSION_REVOKED", refused.text
            assert (await page(http, replica.url, instance_id, staying_cookie)).status_code == 200
