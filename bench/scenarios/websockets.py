"""Websocket scenarios: console round-trip through the game server's stdin and stdout, raw websocket
echo round-trip and bulk throughput through the IDE path (the agent's IDE stand-in echoes every
message), and many idle consoles (the proxy's memory with N websockets open).

Latency clients run on a blocking socket in a worker thread (see loadgen); the idle consoles are
trio-websocket clients in one nursery. The console is paced below the gateway's per-connection
command rate limit in every column, so all columns see the same load. It must never count an answer
it did not match to its own message.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from functools import partial

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from bench.harness import AgentRow, Suite, insert_instances, route_missing_reason
from bench.loadgen import (
    BlockingWebSocket,
    Message,
    WebSocketRejected,
    measure_echo_throughput,
    measure_round_trips,
)
from bench.processes import BenchError
from bench.results import Metric, ScenarioResult, Target
from bench.scenarios.common import (
    MB,
    MISSING_ROUTE_STATUSES,
    cores_watched,
    human_size,
    proxy_pids,
)
from bench.system import rss_bytes
from gateway.console import ConsoleLimits

CONSOLE_PACE_SECONDS = 0.025  # 40 commands/s: under the gateway's default 50/s per connection
ECHO_MESSAGE = "x" * 32
BULK_MESSAGE_BYTES = 256 * 1024
OPEN_CONCURRENCY = 50
HANDSHAKE_TIMEOUT = 15.0


def ws_url(http_url: str) -> str:
    return "ws://" + http_url.removeprefix("http://")


# --- the gateway's side of each websocket ---------------------------------------------------------


async def console_token(suite: Suite, server_id: int) -> str:
    """A console token for `server_id`; RouteMissing-style skip is raised as BenchError text."""
    session = await suite.fresh_session()
    response = await suite.http.post(f"{suite.gateway.url}/api/servers/{server_id}/console/token",
                                     headers=session.headers)
    if response.status_code in MISSING_ROUTE_STATUSES:
        raise GatewaySkip(route_missing_reason("POST", f"/api/servers/{server_id}/console/token",
                                               response.status_code))
    if response.status_code != 200:
        raise BenchError(f"console token answered {response.status_code}: {response.text[:200]}")
    return str(response.json()["token"])


class GatewaySkip(Exception):
    """The gateway column cannot run yet; the message is the reason shown."""


def authenticate_console(ws: BlockingWebSocket, token: str) -> None:
    ws.send(json.dumps({"type": "auth", "token": token}))
    while True:
        frame = json.loads(ws.receive())
        if frame.get("type") == "ready":
            return
        if frame.get("type") == "error":
            raise BenchError(f"console auth refused: {frame}")


async def ide_cookie(suite: Suite, server_id: int | None = None) -> dict[str, str]:
    """Headers that open the IDE proxy for a dev server (the bench's own by default): token → cookie, as a
    browser does."""
    session = await suite.fresh_session()
    server_id = suite.dev_server_id if server_id is None else server_id
    path = f"/api/dev/{server_id}/ide-token"
    response = await suite.http.post(f"{suite.gateway.url}{path}", headers=session.headers)
    if response.status_code in MISSING_ROUTE_STATUSES:
        raise GatewaySkip(route_missing_reason("POST", path, response.status_code))
    if response.status_code not in (200, 201):
        raise BenchError(f"ide-token answered {response.status_code}: {response.text[:200]}")
    body = response.json()
    url = str(body.get("url") or body.get("path") or f"/__ide/{server_id}/")
    if "token=" not in url:
        url += ("&" if "?" in url else "?") + f"token={body['token']}"
    if url.startswith("/"):
        url = suite.gateway.url + url
    exchange = await suite.http.get(url, follow_redirects=False)
    if exchange.status_code in MISSING_ROUTE_STATUSES:
        raise GatewaySkip(route_missing_reason("GET", "/__ide/{id}/?token=…", exchange.status_code))
    cookies = "; ".join(f"{c.name}={c.value}" for c in suite.http.cookies.jar)
    suite.http.cookies.clear()
    if not cookies:
        raise BenchError(f"the IDE token exchange set no cookie (HTTP {exchange.status_code})")
    return {"Cookie": cookies}


# --- console round trip ---------------------------------------------------------------------------


CONSOLE_RT = Metric("p50_us", "round trip p50", "µs", False)
CONSOLE_P99 = Metric("p99_us", "round trip p99", "µs", False)


def console_exchange(tag: str) -> Callable[[int], tuple[Message, Callable[[Message], bool]]]:
    def make(index: int) -> tuple[Message, Callable[[Message], bool]]:
        marker = f"zlh-bench-{tag}-{index}"
        frame = json.dumps({"type": "command", "command": f"echo {marker}"})

        def is_answer(message: Message) -> bool:
            if isinstance(message, bytes) or marker not in message:
                return False
            parsed = json.loads(message)
            return bool(parsed.get("type") == "line" and parsed.get("data") == marker)

        return frame, is_answer

    return make


def paced(exchange: Callable[[int], tuple[Message, Callable[[Message], bool]]],
          interval: float) -> Callable[[int], tuple[Message, Callable[[Message], bool]]]:
    """Wait until `interval` after the previous send before building the next message."""
    last = [0.0]

    def make(index: int) -> tuple[Message, Callable[[Message], bool]]:
        wait = last[0] + interval - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        last[0] = time.perf_counter()
        return exchange(index)

    return make


async def console_round_trip(suite: Suite) -> ScenarioResult:
    count = suite.config.console_commands
    result = ScenarioResult("console_rtt", "console round trip (command → game server → line)",
                            [CONSOLE_RT, CONSOLE_P99],
                            [Target("p50_us", "≤ 1.3x nginx", "nginx", 1.3, False)])
    agent_auth = {"Authorization": f"Bearer {suite.agent.secret}"}
    columns: list[tuple[str, str, dict[str, str]]] = [
        ("direct", ws_url(suite.agent.url) + "/console", agent_auth)]
    columns.append(("gateway", ws_url(suite.gateway.url) + f"/api/servers/{suite.game_server_id}/console", {}))
    if suite.nginx is not None:
        columns.append(("nginx", ws_url(suite.nginx.url) + "/console", agent_auth))
    else:
        result.skip("nginx", suite.nginx_skip or "nginx is not running")
    for column, url, headers in columns:
        token = None
        if column == "gateway":
            try:
                token = await console_token(suite, suite.game_server_id)
            except GatewaySkip as skip:
                result.skip("gateway", str(skip))
                suite.progress(f"  gateway: {skip}")
                continue
        try:
            ws = await trio.to_thread.run_sync(partial(BlockingWebSocket.connect, url, headers=headers))
        except WebSocketRejected as rejected:
            if column == "gateway" and rejected.status in MISSING_ROUTE_STATUSES:
                result.skip("gateway", route_missing_reason("GET", "/api/servers/{id}/console", rejected.status))
                continue
            raise
        try:
            if token is not None:
                await trio.to_thread.run_sync(authenticate_console, ws, token)
            exchange = paced(console_exchange(secrets.token_hex(3)), CONSOLE_PACE_SECONDS)
            async with cores_watched(result):
                trips = await trio.to_thread.run_sync(
                    measure_round_trips, ws, exchange, count, count * CONSOLE_PACE_SECONDS * 3 + 10)
        finally:
            ws.close()
        result.record(column, "p50_us", trips.p50_us)
        result.record(column, "p99_us", trips.p99_us)
        suite.progress(f"  {column}: p50 {trips.p50_us:,.0f} µs, p99 {trips.p99_us:,.0f} µs ({trips.count} commands)")
    result.notes.append(f"{count} `echo` commands per column, one at a time, paced at "
                        f"{1 / CONSOLE_PACE_SECONDS:.0f}/s (the gateway's default console rate limit is "
                        f"{ConsoleLimits().commands_per_second:.0f}/s); includes the game server's stdin→stdout hop")
    return result


# --- raw websocket echo through the IDE path: latency and bulk ------------------------------------


async def ide_ws_columns(suite: Suite, result: ScenarioResult, path: str) -> list[tuple[str, str, dict[str, str]]]:
    direct = ws_url(suite.agent.url.rsplit(":", 1)[0] + f":{suite.agent.ide_port}") + path
    columns: list[tuple[str, str, dict[str, str]]] = [("direct", direct, {})]
    try:
        cookie = await ide_cookie(suite)
        columns.append(("gateway", ws_url(suite.gateway.url) + f"/__ide/{suite.dev_server_id}{path}", cookie))
    except GatewaySkip as skip:
        result.skip("gateway", str(skip))
        suite.progress(f"  gateway: {skip}")
    if suite.nginx is not None:
        columns.append(("nginx", ws_url(suite.nginx.url) + "/__ide" + path, {}))
    else:
        result.skip("nginx", suite.nginx_skip or "nginx is not running")
    return columns


def open_echo(url: str, headers: dict[str, str]) -> BlockingWebSocket:
    ws = BlockingWebSocket.connect(url, headers=headers)
    ws.receive()  # the echo server's greeting: a JSON description of the request it saw
    return ws


def echo_exchange(index: int) -> tuple[Message, Callable[[Message], bool]]:
    message = f"{index:08d}{ECHO_MESSAGE}"
    return message, lambda answer: answer == message


async def websocket_echo(suite: Suite) -> ScenarioResult:
    result = ScenarioResult("ws_echo", "websocket echo round trip (IDE path)", [
        Metric("p50_us", "round trip p50", "µs", False), Metric("p99_us", "round trip p99", "µs", False),
        Metric("msgs_per_s", "messages", "msg/s", True)])
    for column, url, headers in await ide_ws_columns(suite, result, "/bench-echo"):
        ws = await trio.to_thread.run_sync(open_echo, url, headers)
        try:
            async with cores_watched(result):
                trips = await trio.to_thread.run_sync(
                    measure_round_trips, ws, echo_exchange, suite.config.round_trips,
                    suite.config.round_trip_seconds)
        finally:
            ws.close()
        result.record(column, "p50_us", trips.p50_us)
        result.record(column, "p99_us", trips.p99_us)
        result.record(column, "msgs_per_s", trips.messages_per_second)
        suite.progress(f"  {column}: p50 {trips.p50_us:,.0f} µs, {trips.messages_per_second:,.0f} msg/s")
    result.notes.append("one connection, one 40-byte text message at a time, echoed by the agent's IDE "
                        "stand-in: the proxy's own websocket cost, without a game server in the loop")
    return result


async def websocket_bulk(suite: Suite) -> ScenarioResult:
    total = suite.config.ws_bulk_bytes
    result = ScenarioResult("ws_bulk", f"websocket bulk echo {human_size(total)}",
                            [Metric("mb_per_s", "echoed payload", "MB/s", True)],
                            [Target("mb_per_s", "≥ 0.9x nginx", "nginx", 0.9, True)])
    for column, url, headers in await ide_ws_columns(suite, result, "/bench-bulk"):
        ws = await trio.to_thread.run_sync(open_echo, url, headers)
        try:
            async with cores_watched(result):
                transfer = await trio.to_thread.run_sync(
                    measure_echo_throughput, ws, BULK_MESSAGE_BYTES, total, 60.0)
        finally:
            ws.close()
        result.record(column, "mb_per_s", transfer.megabytes_per_second)
        suite.progress(f"  {column}: {transfer.megabytes_per_second:,.0f} MB/s")
    result.notes.append(f"{human_size(BULK_MESSAGE_BYTES)} binary messages echoed one at a time; MB/s counts "
                        "the payload once (it crosses the proxy twice)")
    return result


# --- many idle consoles ---------------------------------------------------------------------------


async def idle_consoles(suite: Suite) -> ScenarioResult:
    count = suite.config.idle_consoles
    result = ScenarioResult("idle_consoles", f"{count} idle console websockets", [
        Metric("rss_mb", f"proxy RSS with {count} open", "MB", False),
        Metric("kb_per_ws", "RSS growth per websocket", "KB", False)],
        [Target("rss_mb", "≤ 80 MB", None, 80.0, False)])
    result.skip("direct", "nothing sits between client and agent to measure")
    per_server = ConsoleLimits().per_server_connections
    servers = math.ceil(count / per_server)
    agent = suite.agent
    ids = await suite.gateway.storage(insert_instances, suite.session.user_id,
                                      [AgentRow("game", agent.port, agent.secret)] * servers, "idle")
    try:
        tokens = [await console_token(suite, server_id) for server_id in ids]
    except GatewaySkip as skip:
        result.skip("gateway", str(skip))
        tokens = []
    if tokens:
        urls = [ws_url(suite.gateway.url) + f"/api/servers/{server_id}/console" for server_id in ids]
        await _hold_consoles(suite, result, "gateway", [
            (urls[i // per_server], tokens[i // per_server], {}) for i in range(count)])
    if suite.nginx is not None:
        agent_auth = {"Authorization": f"Bearer {agent.secret}"}
        await _hold_consoles(suite, result, "nginx",
                             [(ws_url(suite.nginx.url) + "/console", None, agent_auth)] * count)
    else:
        result.skip("nginx", suite.nginx_skip or "nginx is not running")
    result.notes.append(f"{servers} servers × ≤{per_server} consoles (the gateway's per-server cap); "
                        "RSS read once all are open and authenticated")
    return result


async def _hold_consoles(suite: Suite, result: ScenarioResult, column: str,
                         targets: list[tuple[str, str | None, dict[str, str]]]) -> None:
    pids = proxy_pids(suite, column)
    before = rss_bytes(pids) or 0
    opened = 0
    limiter = trio.CapacityLimiter(OPEN_CONCURRENCY)
    all_open = trio.Event()

    async def hold(nursery: trio.Nursery, url: str, token: str | None, headers: dict[str, str]) -> None:
        nonlocal opened
        async with limiter:
            ws: WebSocketConnection = await connect_websocket_url(
                nursery, url, extra_headers=[(k.encode(), v.encode()) for k, v in headers.items()])
            if token is not None:
                await ws.send_message(json.dumps({"type": "auth", "token": token}))
                while json.loads(await ws.get_message()).get("type") != "ready":
                    pass
        opened += 1
        if opened == len(targets):
            all_open.set()
        await trio.sleep_forever()

    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT + len(targets) / 20):
            async with trio.open_nursery() as nursery:
                for url, token, headers in targets:
                    nursery.start_soon(hold, nursery, url, token, headers)
                async with cores_watched(result):
                    await all_open.wait()
                await trio.sleep(1.0)  # let allocations settle before reading
                after = rss_bytes(pids) or 0
                nursery.cancel_scope.cancel()
    except (HandshakeError, ConnectionClosed) as exc:
        raise BenchError(f"{column}: console {opened + 1} of {len(targets)} failed: {exc!r}") from exc
    result.record(column, "rss_mb", after / MB)
    result.record(column, "kb_per_ws", (after - before) / len(targets) / 1000)
    suite.progress(f"  {column}: RSS {after / MB:.1f} MB with {len(targets)} open "
                   f"({(after - before) / len(targets) / 1000:.1f} KB each)")
