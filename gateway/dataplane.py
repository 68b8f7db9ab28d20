"""The data-plane routes the front server serves natively, and their handlers for file and backup
streams. Which requests are allowed, and to which agent they go, is decided by the `authorize`
function the control layer hands in (a StreamGrant); this module only moves bytes, to a target built
from checked parts (gateway/outbound.py): the file path re-encoded within its length caps, ids
percent-encoded."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from .agent_client import AgentTarget
from .errors import ApiError
from .metrics import Metrics
from .outbound import check_file_path, segment
from .server import Exchange, Handler, Request
from .streams import relay, request_headers
from .upstream import UpstreamPool


@dataclass(frozen=True)
class StreamGrant:
    """What the rules allow for one data-plane request."""

    agent: AgentTarget
    upload_limit: int | None = None
    instance_id: int | None = None


Authorize = Callable[[Request, int], Awaitable[StreamGrant]]

DOWNLOAD_HEADERS = frozenset({b"range", b"if-range", b"if-none-match", b"if-modified-since", b"accept"})
UPLOAD_HEADERS = frozenset({b"content-type", b"content-length", b"upload-offset", b"content-range"})
MAX_ID = 2**63 - 1  # ids are 64-bit database keys; a larger number names nothing


@dataclass
class FileStreams:
    pool: UpstreamPool
    authorize: Authorize
    metrics: Metrics

    async def _forward(self, exchange: Exchange, params: dict[str, str], method: str, target: str, *,
                       upload: bool) -> None:
        """Authorize, then relay to the agent with only the headers that route needs and the agent's
        own secret (never the caller's credentials)."""
        server_id = int(params["id"])
        if server_id > MAX_ID:
            raise ApiError(404, "SERVER_NOT_FOUND", {"id": params["id"]})
        grant = await self.authorize(exchange.request, server_id)
        keep = UPLOAD_HEADERS if upload else DOWNLOAD_HEADERS
        headers = [*request_headers(exchange.request.headers, keep=keep),
                   (b"authorization", f"Bearer {grant.agent.secret}".encode())]
        with self.metrics.open_streams.labels("upload" if upload else "download").track_inprogress():
            await relay(exchange, self.pool, grant.agent.host, grant.agent.port, method, target, headers,
                        send_body=upload, upload_limit=grant.upload_limit if upload else None, metrics=self.metrics)

    async def download(self, exchange: Exchange, params: dict[str, str]) -> None:
        await self._forward(exchange, params, "GET", "/files/download" + _file_query(exchange.request), upload=False)

    async def upload(self, exchange: Exchange, params: dict[str, str]) -> None:
        await self._forward(exchange, params, "PUT", "/files/upload" + _file_query(exchange.request), upload=True)

    async def upload_chunk(self, exchange: Exchange, params: dict[str, str]) -> None:
        await self._forward(exchange, params, "PATCH", f"/files/uploads/{segment(params['upload'])}", upload=True)

    async def backup_download(self, exchange: Exchange, params: dict[str, str]) -> None:
        await self._forward(exchange, params, "GET", f"/backups/{segment(params['backup'])}/download", upload=False)


def _file_query(request: Request) -> str:
    """The agent's query for a file stream: the client's `path` (the first, as the agent reads it)
    and nothing else, checked and re-encoded, so the agent sees exactly the path that was checked."""
    try:
        pairs = parse_qsl(request.query, keep_blank_values=True, errors="strict", max_num_fields=64)
    except ValueError:  # a UnicodeDecodeError, or too many fields
        raise ApiError(400, "BAD_REQUEST", {"reason": "query string is not UTF-8 form encoding"}) from None
    path = next((value for name, value in pairs if name == "path"), None)
    return "" if path is None else "?" + urlencode({"path": check_file_path(path)})


@dataclass(frozen=True)
class DataRoute:
    methods: frozenset[str]
    pattern: re.Pattern[str]
    handler: Handler
    name: str
    websocket: bool = False


def path_router(routes: list[DataRoute],
                host_route: Callable[[Request], tuple[Handler, dict[str, str], str] | None] | None = None,
                ) -> Callable[[Request], tuple[Handler, dict[str, str], str] | None]:
    """The front server's router: host-based routes first (IDE hosts own every path), then paths."""

    def route(request: Request) -> tuple[Handler, dict[str, str], str] | None:
        if host_route is not None:
            hosted = host_route(request)
            if hosted is not None:
                return hosted
        for candidate in routes:
            if request.method not in candidate.methods:
                continue
            match = candidate.pattern.match(request.path)
            if match is None:
                continue
            if candidate.websocket and (request.header(b"upgrade") or b"").lower() != b"websocket":
                continue
            return candidate.handler, match.groupdict(), candidate.name
        return None

    return route
