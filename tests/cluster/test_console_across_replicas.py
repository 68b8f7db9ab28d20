"""Consoles across replicas, with a real agent: a suspension decided on the fleet leader closes the
console another replica holds (a cross-replica event, well before the relay's own 30 s access
check), and a client whose replica was killed resumes on another from its last sequence number with
no line lost or repeated (the agent keeps the history)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from bench.harness import AgentRow
from storage import billing as store_billing
from storage import cluster as store_cluster
from tests.cluster.helpers import (
    bearer,
    cluster,
    insert_agents,
    real_agent,
    register,
    storage,
    wait_until,
)
from tests.conftest import DATABASES

pytestmark = pytest.mark.skipif("postgresql" not in DATABASES, reason="scale-out runs on PostgreSQL only")


async def console_auth(http: httpx.AsyncClient, url: str, session: dict[str, Any], server_id: int,
                       since: int | None = None) -> str:
    token = await http.post(f"{url}/api/servers/{server_id}/console/token", headers=bearer(session))
    assert token.status_code == 200, token.text
    frame: dict[str, Any] = {"type": "auth", "token": token.json()["token"]}
    if since is not None:
        frame["since"] = since
    return json.dumps(frame)


def ws_url(url: str, server_id: int) -> str:
    return url.replace("http://", "ws://") + f"/api/servers/{server_id}/console"


async def authenticate(ws: WebSocketConnection, auth: str) -> None:
    await ws.send_message(auth)
    assert json.loads(await ws.get_message())["type"] == "ready"


async def next_lines(ws: WebSocketConnection, count: int) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    with trio.fail_after(20):
        while len(lines) < count:
            frame = json.loads(await ws.get_message())
            assert frame.get("type") != "gap", frame
            if frame.get("type") == "line":
                lines.append(frame)
    return lines


async def leader_and_follower(url: str, names: list[str]) -> tuple[str, str]:
    async def elected() -> bool:
        return await storage(url, store_cluster.lease_holder) in names

    await wait_until(elected, 15)
    leader = await storage(url, store_cluster.lease_holder)
    return leader, next(n for n in names if n != leader)


async def test_suspension_on_the_leader_closes_a_console_held_by_another_replica(
        pg_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = pg_cluster.fresh_database()
    async with real_agent(tmp_path) as agent, cluster(url, tmp_path, BILLING_INTERVAL="0.3") as replicas, \
            httpx.AsyncClient(timeout=10) as http:
        await replicas.start("r1", "r2")
        leader, follower = await leader_and_follower(url, ["r1", "r2"])
        holder = replicas.replicas[follower]
        session = await register(http, holder.url, "player@example.com")
        user_id = session["user"]["id"]
        # Two game servers on the free plan (one covered): the newer one is over the limit.
        kept, over = await insert_agents(url, user_id, [AgentRow("game", agent["port"], agent["secret"])] * 2, "srv")
        auth = await console_auth(http, holder.url, session, over)
        with trio.fail_after(30):
            async with open_websocket_url(ws_url(holder.url, over)) as ws:
                await authenticate(ws, auth)
                await next_lines(ws, 2)
                # Billing enforcement starts for this account; the leader's scheduler suspends `over`.
                opened = trio.current_time()
                await storage(url, store_billing.ensure_account, user_id)
                with trio.fail_after(10):
                    while True:
                        try:
                            await ws.get_message()
                        except ConnectionClosed as closed:
                            assert closed.reason.code == 4010, closed.reason
                            break
                elapsed = trio.current_time() - opened
        print(f"\nsuspension on {leader} closed the console on {follower} after {elapsed:.2f}s")
        assert elapsed < 5  # the relay's own access re-check comes only every 30 s
        await wait_until(lambda: storage(url, store_billing.is_suspended, over), 15)  # after the agent stopped
        assert not await storage(url, store_billing.is_suspended, kept)


async def test_console_resumes_on_another_replica_after_kill_without_lost_lines(
        pg_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = pg_cluster.fresh_database()
    async with real_agent(tmp_path) as agent, cluster(url, tmp_path) as replicas, \
            httpx.AsyncClient(timeout=10) as http:
        first, second = await replicas.start("r1", "r2")
        session = await register(http, first.url, "player@example.com")
        [server] = await insert_agents(url, session["user"]["id"], [AgentRow("game", agent["port"], agent["secret"])],
                                       "srv")
        auth = await console_auth(http, first.url, session, server)
        seen: list[dict[str, Any]] = []
        with trio.move_on_after(10):  # leaving a websocket whose server was killed must not hang the test
            async with open_websocket_url(ws_url(first.url, server)) as ws:
                await authenticate(ws, auth)
                seen = await next_lines(ws, 5)
                first.kill()  # kill -9: the socket just drops, no close frame from the gateway
        assert len(seen) == 5
        last = seen[-1]["seq"]
        await trio.sleep(0.5)  # lines keep coming at the agent while the client reconnects

        auth = await console_auth(http, second.url, session, server, since=last)
        with trio.fail_after(30):
            async with open_websocket_url(ws_url(second.url, server)) as ws:
                await authenticate(ws, auth)
                resumed = await next_lines(ws, 15)
        sequence = [line["seq"] for line in seen] + [line["seq"] for line in resumed]
        assert resumed[0]["seq"] == last + 1, (last, resumed[:3])
        assert sequence == list(range(sequence[0], sequence[0] + len(sequence))), sequence
