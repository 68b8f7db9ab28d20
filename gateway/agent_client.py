"""The one client for every non-streaming call to an agent, over the data plane's h11 pool.

Every call carries the agent's own bearer secret and a timeout. `get_agent_ready` is the low-level
call; `is_agent_ready_result` is the single semantic readiness rule (HTTP 200 *and* a JSON body that
says `"ready": true`; a 200 with ready:false, any other status, a timeout or bad JSON are not ready);
`assert_agent_ready` uses it. Streaming calls (files, console) do not go through here.

It speaks HTTP through `agent_http.SmallCallPool`, not httpx: the poller makes two of these calls per
agent per interval, and httpx's request and response models cost more CPU than the HTTP itself
(measured: 759 µs of CPU per poll through httpx on a keep-alive connection, 350 µs on h11 alone)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import trio

from .agent_http import SmallCallPool
from .errors import ApiError
from .upstream import UpstreamError, UpstreamTimeout

MAX_ANSWER_BYTES = 4 * 1024 * 1024
JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass(frozen=True)
class AgentTarget:
    host: str
    port: int
    secret: str

    @property
    def authorization(self) -> tuple[bytes, bytes]:
        return b"authorization", b"Bearer " + self.secret.encode()


@dataclass(frozen=True)
class AgentResult:
    """What an agent answered: `status` 0 means no HTTP answer at all (see `error`)."""

    status: int
    body: Any = None
    error: str | None = None
    raw: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.error is None


def is_agent_ready_result(result: AgentResult) -> bool:
    """The semantic readiness rule, and the only one."""
    return (
        result.status == 200
        and result.error is None
        and isinstance(result.body, dict)
        and result.body.get("ready") is True
    )


class AgentClient:
    def __init__(self, pool: SmallCallPool, *, timeout: float = 3.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def call(self, target: AgentTarget, method: str, path: str, *, json_body: Any = None,
                   params: dict[str, str] | None = None, timeout: float | None = None) -> AgentResult:
        """One request; never raises for agent trouble (that is data: status 0 and an error). A path
        or header that cannot go out as one well-formed request raises OutboundRefused (a 400)."""
        if params:
            path = f"{path}?{urlencode(params)}"
        headers = [target.authorization]
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers += JSON_HEADERS
        try:
            with trio.CancelScope(deadline=trio.current_time() + (timeout or self._timeout)) as scope:
                status, raw = await self._pool.call(target.host, target.port, method, path, headers, body,
                                                    limit=MAX_ANSWER_BYTES)
        except UpstreamTimeout:
            return AgentResult(0, error="timeout")
        except UpstreamError as exc:
            return AgentResult(0, error=f"unreachable: {type(exc).__name__}")
        if scope.cancelled_caught:
            return AgentResult(0, error="timeout")
        if not raw:
            return AgentResult(status, None, raw=raw)
        try:
            body = json.loads(raw)
        except ValueError:
            return AgentResult(status, None, error="invalid JSON from agent", raw=raw[:512])
        return AgentResult(status, body, raw=raw)

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def get_agent_ready(self, target: AgentTarget) -> AgentResult:
        return await self.call(target, "GET", "/ready")

    async def assert_agent_ready(self, target: AgentTarget) -> None:
        result = await self.get_agent_ready(target)
        if not is_agent_ready_result(result):
            raise ApiError(503, "AGENT_NOT_READY", describe_failure(result))

    async def health(self, target: AgentTarget) -> AgentResult:
        return await self.call(target, "GET", "/health")

    async def status(self, target: AgentTarget) -> AgentResult:
        return await self.call(target, "GET", "/status")


def describe_failure(result: AgentResult) -> str:
    if result.error:
        return result.error if result.status == 0 else f"HTTP {result.status}: {result.error}"
    if result.status != 200:
        return f"HTTP {result.status}"
    if isinstance(result.body, dict) and result.body.get("ready") is False:
        return "agent says not ready"
    return "unexpected answer"


def forward_agent_result(result: AgentResult) -> tuple[Any, int]:
    """An agent answer as a Portal answer: the agent's status is kept, success bodies pass through,
    failures use the envelope."""
    if result.status == 0:
        raise ApiError(504 if result.error == "timeout" else 502,
                       "AGENT_TIMEOUT" if result.error == "timeout" else "AGENT_UNAVAILABLE",
                       {"reason": result.error})
    if result.ok:
        return result.body, result.status
    code = result.body.get("error") if isinstance(result.body, dict) else None
    details = result.body.get("details") if isinstance(result.body, dict) else None
    raise ApiError(result.status, code if isinstance(code, str) else "AGENT_ERROR",
                   details if details is not None else ({"reason": result.error} if result.error else None))
