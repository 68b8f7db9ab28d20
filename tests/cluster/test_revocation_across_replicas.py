"""Ended sessions on every replica: two replicas (real processes, each with its own data directory) on
one PostgreSQL. Disabling or deleting an account, logging out and a password reset, each done on one
replica, refuse the old access token on the other on its very next request — by the `session.end` event
(LISTEN/NOTIFY; the NOTIFY is committed before the ending request answers), not by the periodic resync,
which is set far beyond the test's bounds here. Disabling an account on one replica closes the console
and IDE websocket another replica holds."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from bench.harness import AgentRow
from storage import users
from tests.cluster.helpers import PASSWORD, Cluster, bearer, insert_agents, real_agent, register, storage
from tests.cluster.test_console_across_replicas import authenticate, console_auth, ws_url
from tests.cluster.test_ide_across_replicas import ide_cookie, ide_websocket
from tests.conftest import DATABASES
from tests.control.test_auth import _mail_token

pytestmark = pytest.mark.skipif("postgresql" not in DATABASES, reason="scale-out runs on PostgreSQL only")

EVENT_BOUND = 1.0  # seconds: one NOTIFY round trip on loopback, with a wide margin for a busy machine


class OwnDataDirs(Cluster):
    """Replicas that share only the database and the signing secret, as in production."""

    def env(self, name: str) -> dict[str, str]:
        return {**super().env(name), "ZLH_DATA_DIR": str(self.workdir / name), "ZLH_SESSION_RESYNC": "600"}


async def me(http: httpx.AsyncClient, url: str, session: dict[str, Any]) -> int:
    return (await http.get(f"{url}/api/me", headers=bearer(session))).status_code


async def refused_within(http: httpx.AsyncClient, url: str, session: dict[str, Any]) -> tuple[int, float]:
    """Ask `url` with the old token until it is refused; how many requests still passed, and how long."""
    started, passed = trio.current_time(), 0
    with trio.fail_after(EVENT_BOUND * 5):
        while (status := await me(http, url, session)) == 200:
            passed += 1
    assert status in (401, 403), status
    return passed, trio.current_time() - started


async def test_disable_delete_logout_and_reset_on_one_replica_end_the_token_on_the_other(
        pg_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = pg_cluster.fresh_database()
    async with AsyncExitStack() as stack, httpx.AsyncClient(timeout=10) as http:
        replicas = OwnDataDirs(url, tmp_path, stack)
        origin, other = await replicas.start("r1", "r2")
        admin = await register(http, origin.url, "admin@example.com")
        await storage(url, users.set_role, admin["user"]["id"], "admin")
        admin = (await http.post(f"{origin.url}/api/auth/login", json={"email": "admin@example.com",
                                                                       "password": PASSWORD})).json()
        victims = {how: await register(http, origin.url, f"{how}@example.com")
                   for how in ("disable", "delete", "logout", "reset")}
        kept = (await http.post(f"{origin.url}/api/auth/login", json={"email": "logout@example.com",
                                                                      "password": PASSWORD})).json()
        for session in (*victims.values(), kept):
            assert await me(http, other.url, session) == 200  # both replicas accept every token first

        async def end(how: str, session: dict[str, Any]) -> None:
            user_id = session["user"]["id"]
            if how == "disable":
                done = await http.post(f"{origin.url}/api/admin/users/{user_id}/disable", headers=bearer(admin))
            elif how == "delete":
                done = await http.delete(f"{origin.url}/api/admin/users/{user_id}", headers=bearer(admin))
            elif how == "logout":
                done = await http.post(f"{origin.url}/api/auth/logout", json={"refreshToken": session["refreshToken"]})
            else:
                await http.post(f"{origin.url}/api/auth/password-reset/request", json={"email": "reset@example.com"})
                done = await http.post(f"{origin.url}/api/auth/password-reset/confirm", json={
                    "token": _mail_token(tmp_path / "r1" / "outbox"), "password": "a-new-password-1"})
            assert done.status_code in (200, 204), (how, done.text)

        report = []
        for how, session in victims.items():
            await end(how, session)
            assert await me(http, origin.url, session) in (401, 403), how  # where it was done: at once
            passed, took = await refused_within(http, other.url, session)
            report.append(f"{how}: {passed} request(s) passed on r2, refused after {took * 1000:.1f} ms")
            assert passed == 0 and took < EVENT_BOUND, report[-1]
        print("\n" + "\n".join(report))
        assert await me(http, other.url, kept) == 200  # another login of the logged-out user goes on
        # A replica that starts afterwards learns all of it from the database before it serves.
        [late] = await replicas.start("r3")
        for how, session in victims.items():
            assert await me(http, late.url, session) in (401, 403), how
        assert await me(http, late.url, kept) == 200


async def test_disabling_on_one_replica_closes_the_console_and_ide_websocket_another_holds(
        pg_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = pg_cluster.fresh_database()
    async with real_agent(tmp_path) as agent, AsyncExitStack() as stack, httpx.AsyncClient(timeout=10) as http:
        replicas = OwnDataDirs(url, tmp_path, stack)
        origin, holder = await replicas.start("r1", "r2")
        admin = await register(http, origin.url, "admin@example.com")
        await storage(url, users.set_role, admin["user"]["id"], "admin")
        admin = (await http.post(f"{origin.url}/api/auth/login", json={"email": "admin@example.com",
                                                                       "password": PASSWORD})).json()
        session = await register(http, holder.url, "dev@example.com")
        [game, dev] = await insert_agents(url, session["user"]["id"], [
            AgentRow("game", agent["port"], agent["secret"]),
            AgentRow("dev", agent["port"], agent["secret"], agent["idePort"])], "rv")
        started = await http.post(f"{holder.url}/api/dev/{dev}/codeserver/start", headers=bearer(session))
        assert started.status_code == 200, started.text
        cookie = await ide_cookie(http, holder.url, session, dev)
        auth = await console_auth(http, holder.url, session, game)
        with trio.fail_after(30):
            async with open_websocket_url(ws_url(holder.url, game)) as console, \
                    ide_websocket(holder.url, dev, cookie) as ide:
                await authenticate(console, auth)
                disabled = await http.post(f"{origin.url}/api/admin/users/{session['user']['id']}/disable",
                                           headers=bearer(admin))
                assert disabled.status_code == 200, disabled.text
                cut = trio.current_time()
                with trio.fail_after(5):
                    while True:
                        try:
                            await console.get_message()
                        except ConnectionClosed as closed:
                            assert closed.reason.code == 4010, closed.reason
                            break
                    with pytest.raises(ConnectionClosed):
                        while True:
                            await ide.get_message()
                took = trio.current_time() - cut
        print(f"\ndisable on r1 closed the console and IDE websocket on r2 after {took * 1000:.0f} ms")
        assert took < 2  # the event, not the 30 s re-checks
        refused = await http.get(f"{holder.url}/__ide/{dev}/", headers={"cookie": cookie})
        assert refused.status_code == 403 and refused.json()["error"] == "ACCOUNT_DISABLED"
