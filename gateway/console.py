"""The websocket console relay: a Portal client on one side, the agent's `WS /console` on the other.

Protocol with the client (JSON text frames):
  client → {"type": "auth", "token": <console token>, "since": <last seq seen, optional>}   (first frame,
           within AUTH_TIMEOUT; may be sent again later to re-authenticate before expiry)
  gateway → {"type": "ready", "expiresAt": <epoch s>}            after a successful auth
  gateway → agent frames as they are: {"type": "line", "seq", "ts", "data"}, {"type": "gap", …},
            {"type": "state", …}
  client → {"type": "command", "command": "…"}                  forwarded to the game server's stdin
  gateway → {"type": "token-expiring", "expiresAt", "in"}        ahead of expiry; re-auth on the socket
Sequence numbers are the agent's, so a client that reconnects with `since` gets exactly the lines it
missed (the agent replays from its history), without gaps or duplicates.

Close codes: 4001 auth failed or token expired, 4004 no such server (or not yours), 4008 rate or
policy limit, 4009 too many consoles on this server, 4010 access revoked or account suspended,
1009 message too big, 1011 agent unavailable, 1001 gateway shutting down / agent went away,
1000 normal. Either side closing closes the other.

Never put a long-lived token in a URL; never relay before auth; never buffer without bound (message
queues are size 1, so a slow side slows the other through TCP)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import quote

import trio

from .agent_client import AgentTarget
from .errors import ApiError
from .metrics import Metrics
from .server import Exchange
from .websocket import ConnectionClosed, HandshakeFailed, WebSocket, accept, connect

log = logging.getLogger("zlh.console")

AUTH_TIMEOUT = 10.0
CLOSE_AUTH, CLOSE_NOT_FOUND, CLOSE_POLICY, CLOSE_CAPACITY, CLOSE_REVOKED = 4001, 4004, 4008, 4009, 4010
CLOSE_TOO_BIG, CLOSE_AGENT, CLOSE_AWAY, CLOSE_NORMAL = 1009, 1011, 1001, 1000


@dataclass(frozen=True)
class ConsoleGrant:
    agent: AgentTarget
    user_id: int
    instance_id: int
    expires_at: float  # epoch seconds


ConsoleAuthorize = Callable[[str, int], Awaitable[ConsoleGrant]]
StillAllowed = Callable[[int, int], Awaitable[bool]]
Clock = Callable[[], float]


@dataclass(frozen=True)
class ConsoleLimits:
    max_message_bytes: int = 64 * 1024
    commands_per_second: float = 50.0
    command_burst: int = 200
    per_server_connections: int = 20
    warn_before_expiry: float = 60.0
    ping_interval: float = 30.0
    access_check_interval: float = 30.0


class _SessionEnd(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class _TokenBucket:
    rate: float
    burst: int
    tokens: float = 0.0
    stamp: float = 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class ConsoleRelay:
    authorize: ConsoleAuthorize
    still_allowed: StillAllowed
    metrics: Metrics
    clock: Clock
    limits: ConsoleLimits = field(default_factory=ConsoleLimits)
    _per_server: Counter[int] = field(default_factory=Counter)
    _sessions: dict[int, set[trio.CancelScope]] = field(default_factory=dict)
    _by_instance: dict[int, set[trio.CancelScope]] = field(default_factory=dict)

    def disconnect_user(self, user_id: int) -> int:
        """Close every console of `user_id` on this replica (revocation) with 4010."""
        scopes = self._sessions.get(user_id, set())
        for scope in list(scopes):
            scope.cancel()
        return len(scopes)

    def disconnect_instance(self, instance_id: int) -> int:
        """Close every console of one server on this replica (suspension) with 4010."""
        scopes = self._by_instance.get(instance_id, set())
        for scope in list(scopes):
            scope.cancel()
        return len(scopes)

    async def handle(self, exchange: Exchange, params: dict[str, str]) -> None:
        server_id = int(params["id"])
        stream, _trailing = exchange.take_over()  # exchange.raw holds the upgrade request and anything after it
        exchange.status = 101
        try:
            with trio.fail_after(AUTH_TIMEOUT):
                client = await accept(stream, exchange.raw, _pick_subprotocol,
                                      max_message=self.limits.max_message_bytes)
        except (trio.TooSlowError, HandshakeFailed, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await self._session(client, server_id)

    async def _session(self, client: WebSocket, server_id: int) -> None:
        self.metrics.open_consoles.inc()
        try:
            grant, since = await self._authenticate_first(client, server_id)
        except _SessionEnd as refused:
            await _close(client, refused.code, refused.reason)
            self.metrics.open_consoles.dec()
            return
        if self._per_server[grant.instance_id] >= self.limits.per_server_connections:
            await _close(client, CLOSE_CAPACITY, "too many consoles on this server")
            self.metrics.open_consoles.dec()
            return
        self._per_server[grant.instance_id] += 1
        scope = trio.CancelScope()
        self._sessions.setdefault(grant.user_id, set()).add(scope)
        self._by_instance.setdefault(grant.instance_id, set()).add(scope)
        end = _SessionEnd(CLOSE_NORMAL, "closed")
        try:
            with scope:
                end = await self._relay(client, server_id, grant, since)
            if scope.cancelled_caught:
                end = _SessionEnd(CLOSE_REVOKED, "access revoked")
        finally:
            self._per_server[grant.instance_id] -= 1
            if self._per_server[grant.instance_id] <= 0:
                del self._per_server[grant.instance_id]
            for registry, key in ((self._sessions, grant.user_id), (self._by_instance, grant.instance_id)):
                registry[key].discard(scope)
                if not registry[key]:
                    del registry[key]
            self.metrics.open_consoles.dec()
            with trio.CancelScope(shield=True):
                await _close(client, end.code, end.reason)

    async def _authenticate_first(self, client: WebSocket, server_id: int) -> tuple[ConsoleGrant, int | None]:
        try:
            with trio.fail_after(AUTH_TIMEOUT):
                message = await client.get_message()
        except trio.TooSlowError:
            raise _SessionEnd(CLOSE_AUTH, "auth frame expected") from None
        except ConnectionClosed:
            raise _SessionEnd(CLOSE_NORMAL, "client left") from None
        frame = _parse(message)
        if frame is None or frame.get("type") != "auth" or not isinstance(frame.get("token"), str):
            raise _SessionEnd(CLOSE_AUTH, "first frame must be {type: auth, token}")
        since = frame.get("since")
        if since is not None and (not isinstance(since, int) or isinstance(since, bool) or since < 0):
            raise _SessionEnd(CLOSE_POLICY, "since must be a non-negative integer")
        grant = await self._verify(str(frame["token"]), server_id)
        return grant, since

    async def _verify(self, token: str, server_id: int) -> ConsoleGrant:
        try:
            return await self.authorize(token, server_id)
        except ApiError as error:
            code = CLOSE_NOT_FOUND if error.status == 404 else CLOSE_REVOKED if error.status == 403 else CLOSE_AUTH
            raise _SessionEnd(code, error.code) from None

    async def _relay(self, client: WebSocket, server_id: int, grant: ConsoleGrant,
                     since: int | None) -> _SessionEnd:
        agent = grant.agent
        resource = "/console" + (f"?since={quote(str(since))}" if since is not None else "")
        try:
            with trio.fail_after(10):
                upstream_stream = await trio.open_tcp_stream(agent.host, agent.port)
        except (OSError, trio.TooSlowError):
            return _SessionEnd(CLOSE_AGENT, "agent unavailable")
        outcome: list[_SessionEnd] = []
        state = {"grant": grant}
        try:
            with trio.fail_after(10):
                upstream = await connect(upstream_stream, f"{agent.host}:{agent.port}", resource,
                                         [(b"authorization", f"Bearer {agent.secret}".encode())],
                                         max_message=4 * 1024 * 1024)
        except (trio.TooSlowError, HandshakeFailed, OSError, trio.BrokenResourceError) as exc:
            log.warning("console upstream handshake failed: %s", type(exc).__name__)
            with trio.CancelScope(shield=True):
                await upstream_stream.aclose()
            return _SessionEnd(CLOSE_AGENT, "agent unavailable")
        async with trio.open_nursery() as nursery:
            await client.send_message(json.dumps({"type": "ready", "expiresAt": grant.expires_at}))

            def finish(end: _SessionEnd) -> None:
                if not outcome:
                    outcome.append(end)
                nursery.cancel_scope.cancel()

            nursery.start_soon(self._client_to_agent, client, upstream, server_id, state, finish)
            nursery.start_soon(self._agent_to_client, client, upstream, finish)
            nursery.start_soon(self._watch, client, upstream, state, finish)
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await upstream.aclose(CLOSE_NORMAL)
        return outcome[0] if outcome else _SessionEnd(CLOSE_AWAY, "closed")

    async def _client_to_agent(self, client: WebSocket, upstream: WebSocket, server_id: int,
                               state: dict[str, ConsoleGrant], finish: Callable[[_SessionEnd], None]) -> None:
        bucket = _TokenBucket(self.limits.commands_per_second, self.limits.command_burst,
                              tokens=self.limits.command_burst, stamp=trio.current_time())
        while True:
            try:
                message, raw = await client.next_message_raw()
            except ConnectionClosed as closed:
                code = closed.reason.code if closed.reason else CLOSE_NORMAL
                finish(_SessionEnd(CLOSE_TOO_BIG if code == CLOSE_TOO_BIG else CLOSE_NORMAL, "client closed"))
                return
            frame = _parse(message)
            kind = frame.get("type") if frame else None
            if kind == "command" and isinstance(frame.get("command"), str):  # type: ignore[union-attr]
                if not bucket.take(trio.current_time()):
                    finish(_SessionEnd(CLOSE_POLICY, "command rate limit exceeded"))
                    return
                try:
                    # Forward the client's frame as it came (masked, as the agent expects from a
                    # client) when it holds nothing else; anything extra never reaches the agent.
                    if len(frame) == 2:  # type: ignore[arg-type]
                        await upstream.send_raw(raw)
                    else:
                        await upstream.send_message(json.dumps(
                            {"type": "command", "command": frame["command"]}))  # type: ignore[index]
                except ConnectionClosed:
                    finish(_SessionEnd(CLOSE_AWAY, "agent closed"))
                    return
            elif kind == "auth" and isinstance(frame.get("token"), str):  # type: ignore[union-attr]
                try:
                    grant = await self._verify(str(frame["token"]), server_id)  # type: ignore[index]
                except _SessionEnd as end:
                    finish(end)
                    return
                state["grant"] = grant
                await client.send_message(json.dumps({"type": "ready", "expiresAt": grant.expires_at}))
            else:
                finish(_SessionEnd(CLOSE_POLICY, "unknown frame"))
                return

    async def _agent_to_client(self, client: WebSocket, upstream: WebSocket,
                               finish: Callable[[_SessionEnd], None]) -> None:
        while True:
            try:
                frames = await upstream.forward_messages()  # as the agent sent them: valid for the client
            except ConnectionClosed as closed:
                code = closed.reason.code if closed.reason else CLOSE_AGENT
                finish(_SessionEnd(CLOSE_AWAY if code in (CLOSE_NORMAL, CLOSE_AWAY) else CLOSE_AGENT,
                                   "agent closed the console"))
                return
            try:
                await client.send_raw(frames)
            except ConnectionClosed:
                finish(_SessionEnd(CLOSE_NORMAL, "client closed"))
                return

    async def _watch(self, client: WebSocket, upstream: WebSocket,
                     state: dict[str, ConsoleGrant], finish: Callable[[_SessionEnd], None]) -> None:
        """Token expiry (warned ahead, enforced at the moment), periodic access re-check, keep-alive pings."""
        warned_for: float | None = None
        next_access_check = trio.current_time() + self.limits.access_check_interval
        next_ping = trio.current_time() + self.limits.ping_interval
        while True:
            grant = state["grant"]
            remaining = grant.expires_at - self.clock()
            if remaining <= 0:
                finish(_SessionEnd(CLOSE_AUTH, "token expired"))
                return
            if remaining <= self.limits.warn_before_expiry and warned_for != grant.expires_at:
                warned_for = grant.expires_at
                try:
                    await client.send_message(json.dumps({"type": "token-expiring", "expiresAt": grant.expires_at,
                                                          "in": round(remaining, 1)}))
                except ConnectionClosed:
                    return
            now = trio.current_time()
            if now >= next_access_check:
                next_access_check = now + self.limits.access_check_interval
                if not await self.still_allowed(grant.user_id, grant.instance_id):
                    finish(_SessionEnd(CLOSE_REVOKED, "access revoked"))
                    return
            if now >= next_ping:
                next_ping = now + self.limits.ping_interval
                for side in (client, upstream):
                    try:
                        await side.ping()
                    except (ConnectionClosed, ValueError):
                        pass
            until_event = remaining if warned_for == grant.expires_at else remaining - self.limits.warn_before_expiry
            await trio.sleep_until(min(next_access_check, next_ping, now + max(0.05, until_event)))


def _parse(message: str | bytes) -> dict[str, object] | None:
    try:
        frame = json.loads(message)
    except (ValueError, UnicodeDecodeError):
        return None
    return frame if isinstance(frame, dict) else None


def _pick_subprotocol(offered: Iterable[str]) -> str | None:
    return "zlh-console.v1" if "zlh-console.v1" in offered else None


async def _close(connection: WebSocket, code: int, reason: str) -> None:
    with trio.move_on_after(2):
        await connection.aclose(code, reason)  # best effort: never raises for a peer already gone
