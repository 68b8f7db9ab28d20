"""The hosted IDE reverse proxy: a browser reaches the code-server in its dev container through the
gateway, by path (`/__ide/<id>/…`, the prefix stripped) or by host (`dev-<id>.<IDE_DOMAIN>`, any
path), HTTP and websocket.

Three steps, each its own function (the shape of Coder's workspace-app proxy):
  resolve   — which instance and which upstream path a request names: `resolve_path`, `resolve_host`;
  authorize — the credential it carries (`credential_of`): a short-lived IDE link token in the query
              string is traded for the IDE session cookie and a redirect to the same URL without it;
              later requests and websocket upgrades present the cookie. The rule itself (token kinds,
              ownership, where the container's IDE listens) is control's, handed in as `IdeAuthorize`;
  forward   — HTTP streamed both ways through the UpstreamPool (`IdeProxy.forward_http`); a websocket
              upgrade forwarded as the browser sent it and, after the upstream's 101, the two sockets
              spliced byte for byte (`splice`), so subprotocols and permessage-deflate pass untouched.

Revocation: every request is authorized again, so a revoked session's next request is refused. An
open websocket is cut when `IdeProxy.revoke` names its session (told at once, on every replica, by
control) and, as the backstop for a revocation this replica never heard of, when the periodic
re-check (`IdeProxy.run`, `IdeStillAllowed`) finds the grant gone. A cut websocket is dropped, not
closed with a frame (the splice does not parse frames): the browser sees 1006 and its reconnect is
refused.

Cookies: `zlh_ide_<id>`, HttpOnly, SameSite=Lax, Secure when configured; by path Path=/__ide/<id>/,
by host a host-only cookie with Path=/, so a browser never sends one instance's cookie to another and
the gateway never accepts it there (the session names its instance). Every cookie named `zlh_*` is the
gateway's: none reaches a container and a container cannot set one; Authorization never reaches a
container either. Host, X-Forwarded-Host, X-Forwarded-Proto and Forwarded carry the browser's host,
which code-server's websocket origin check compares with Origin.

Never log a token or a cookie: nothing here logs headers or queries, and the access log redacts the
`token` query key. By-path routing puts every IDE on the gateway's own origin, where cookie paths
separate credentials but are no security boundary between pages; the by-host URL is the isolated one."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote_plus, urlsplit

import trio

from .errors import ApiError
from .forwarded import Network, forwarded_https, header_pairs
from .server import Exchange, Handler, Request
from .streams import STALL_TIMEOUT, declared_length, request_headers, response_headers
from .upstream import (
    Headers,
    UpstreamBroken,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)

log = logging.getLogger("zlh.ide")

TOKEN_PARAM = "token"
GATEWAY_COOKIE_PREFIX = "zlh_"
PATH_ROUTE = re.compile(r"^/__ide/(?P<id>\d{1,18})(?P<rest>/.*)?$")
# For the front server's router, which matches the decoded path; `resolve_path` then reads the raw one.
IDE_PATH = re.compile(r"^/__ide/(?P<id>\d{1,18})(?:/.*)?$")
IDE_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Whatever a client claims about earlier hops is not trusted: the gateway states the browser's view.
CLIENT_FORWARDING = frozenset({b"forwarded", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-for",
                               b"x-real-ip"})
SPLICE_RECEIVE_SIZE = 64 * 1024
HALF_CLOSE_GRACE = 30.0  # after one side of a websocket ends, how long the other may still talk
ACCESS_CHECK_INTERVAL = 30.0  # seconds between re-checks of the grants of open websockets


# --- resolve --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IdeTarget:
    """Which dev instance a request is for and what its IDE should see."""

    instance_id: int
    routing: str  # "path" | "host"
    prefix: str  # what the browser sees before the upstream path: "/__ide/<id>" by path, "" by host
    path: str  # the raw upstream path; "" is the bare `/__ide/<id>`, which redirects to add a slash
    query: str  # the raw query string

    @property
    def cookie_name(self) -> str:
        return f"{GATEWAY_COOKIE_PREFIX}ide_{self.instance_id}"

    @property
    def cookie_path(self) -> str:
        return f"{self.prefix}/"

    def location(self, query: str) -> str:
        """This URL as the browser should load it (always with the slash after the prefix)."""
        return f"{self.prefix}{self.path or '/'}" + (f"?{query}" if query else "")

    @property
    def upstream_target(self) -> str:
        query = without_token(self.query)
        return (self.path or "/") + (f"?{query}" if query else "")


def resolve_path(request: Request) -> IdeTarget | None:
    """`/__ide/<id>[/rest]`, read from the raw target so the upstream path keeps its encoding."""
    raw_path, _, query = request.target.partition("?")
    match = PATH_ROUTE.match(raw_path)
    if match is None:
        return None
    return IdeTarget(int(match["id"]), "path", f"/__ide/{match['id']}", match["rest"] or "", query)


def ide_host_pattern(ide_domain: str) -> re.Pattern[str]:
    return re.compile(r"^dev-(?P<id>\d{1,18})\." + re.escape(ide_domain.strip(".").lower()) + r"(?::\d{1,5})?$")


def resolve_host(request: Request, pattern: re.Pattern[str]) -> IdeTarget | None:
    """`dev-<id>.<IDE_DOMAIN>[:port]`, any path."""
    match = pattern.match(request.host.strip().lower())
    if match is None:
        return None
    raw_path, _, query = request.target.partition("?")
    return IdeTarget(int(match["id"]), "host", "", raw_path, query)


# --- authorize ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IdeCredential:
    token: str
    kind: str  # "link": a short-lived token from the query string; "session": the IDE cookie


@dataclass(frozen=True)
class IdeGrant:
    """What the rules allow: where the instance's IDE listens, and, when a link token was traded, the
    session the browser keeps in its IDE cookie."""

    host: str
    port: int
    instance_id: int
    user_id: int
    family: str | None = None  # the login the session belongs to, if it is bound to one
    session: str | None = None
    session_ttl: int = 0


@dataclass(frozen=True)
class IdeRevocation:
    """Which IDE sessions lose access: every one of a user, those of one login (`family`), or every
    one of an instance (a suspended server)."""

    user_id: int | None = None
    family: str | None = None
    instance_id: int | None = None

    def matches(self, grant: IdeGrant) -> bool:
        return ((self.user_id is not None and self.user_id == grant.user_id)
                or (self.family is not None and self.family == grant.family)
                or (self.instance_id is not None and self.instance_id == grant.instance_id))


IdeAuthorize = Callable[[IdeCredential, int], Awaitable[IdeGrant]]
IdeStillAllowed = Callable[[IdeGrant], Awaitable[bool]]  # the rule again, for an open websocket


class IdeActivity(Protocol):
    """Told about IDE traffic per instance (idle auto-stop reads what it records)."""

    def request_seen(self, instance_id: int) -> None: ...

    def websocket_opened(self, instance_id: int) -> None: ...

    def websocket_closed(self, instance_id: int) -> None: ...


def _query_pairs(query: str) -> list[tuple[str, str]]:
    """(decoded key, raw pair) for each pair of a query string."""
    return [(unquote_plus(part.partition("=")[0]), part) for part in query.split("&") if part]


def query_token(query: str) -> str | None:
    for key, part in _query_pairs(query):
        if key == TOKEN_PARAM:
            return unquote_plus(part.partition("=")[2])
    return None


def without_token(query: str) -> str:
    """The query string minus the IDE token, every other pair kept exactly as sent."""
    if TOKEN_PARAM not in query:
        return query
    return "&".join(part for key, part in _query_pairs(query) if key != TOKEN_PARAM)


def _cookie_pairs(request: Request) -> list[tuple[str, str]]:
    pairs = []
    for key, value in request.headers:
        if key != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            part = part.strip()
            if part:
                pairs.append((part.partition("=")[0].strip(), part))
    return pairs


def cookie_value(request: Request, name: str) -> str | None:
    for key, part in _cookie_pairs(request):
        if key == name:
            return part.partition("=")[2].strip().strip('"')
    return None


def container_cookies(request: Request) -> bytes | None:
    """The request's cookies minus the gateway's own (`zlh_*`): what the container may see."""
    kept = [part for key, part in _cookie_pairs(request) if not key.lower().startswith(GATEWAY_COOKIE_PREFIX)]
    return "; ".join(kept).encode("latin-1") if kept else None


def credential_of(request: Request, target: IdeTarget) -> IdeCredential | None:
    """A link token in the query string wins over the cookie (it is how a new session starts)."""
    token = query_token(target.query)
    if token is not None:
        return IdeCredential(token, "link")
    session = cookie_value(request, target.cookie_name)
    if session:
        return IdeCredential(session, "session")
    return None


def session_cookie(target: IdeTarget, grant: IdeGrant, *, secure: bool) -> bytes:
    assert grant.session is not None
    cookie = (f"{target.cookie_name}={grant.session}; Path={target.cookie_path}; Max-Age={grant.session_ttl}; "
              "HttpOnly; SameSite=Lax")
    return (cookie + "; Secure" if secure else cookie).encode("latin-1")


def origin_matches(request: Request) -> bool:
    """A browser's websocket Origin must name the host it connects to (no Origin: not a browser).
    The same rule code-server applies; checked here too so no IDE behind us depends on its own."""
    origin = request.header(b"origin")
    if origin is None:
        return True
    return urlsplit(origin.decode("latin-1").strip()).netloc.lower() == request.host.strip().lower()


# --- forward --------------------------------------------------------------------------------------

def is_websocket_upgrade(request: Request) -> bool:
    return request.method == "GET" and (request.header(b"upgrade") or b"").strip().lower() == b"websocket"


def upstream_headers(request: Request, public_scheme: str) -> Headers:
    """What the container sees: the browser's headers without hop-by-hop ones, Authorization or
    gateway cookies, plus the browser's host and scheme as code-server's origin check expects."""
    headers = request_headers(request.headers, drop=CLIENT_FORWARDING)
    cookies = container_cookies(request)
    if cookies:
        headers.append((b"cookie", cookies))
    host = (request.header(b"host") or b"").strip()
    client = (request.client or "").rpartition(":")[0]
    node = f'"{client}"' if ":" in client else client
    headers += [
        (b"host", host),
        (b"x-forwarded-host", host),
        (b"x-forwarded-proto", public_scheme.encode()),
        (b"x-forwarded-for", client.encode()),
        (b"forwarded", b"for=" + node.encode() + b";host=" + host + b";proto=" + public_scheme.encode()),
    ]
    return headers


def _set_cookie_name(value: bytes) -> str:
    return value.decode("latin-1").partition("=")[0].strip().lower()


def ide_response_headers(headers: Headers, target: IdeTarget) -> Headers:
    """The container's response headers for the browser: no hop-by-hop, no gateway cookies, and by
    path an absolute-path redirect kept under the prefix."""
    out = []
    for key, value in response_headers(headers):
        if key == b"set-cookie" and _set_cookie_name(value).startswith(GATEWAY_COOKIE_PREFIX):
            continue
        if key == b"location" and target.prefix and value.startswith(b"/") and not value.startswith(b"//"):
            value = target.prefix.encode() + value
        out.append((key, value))
    return out


def switching_protocols_head(upstream: UpstreamResponse, target: IdeTarget) -> bytes:
    lines = [b"HTTP/1.1 101 Switching Protocols"]
    lines += [key + b": " + value for key, value in ide_response_headers(upstream.headers, target)]
    lines += [b"upgrade: websocket", b"connection: Upgrade"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def splice(client: trio.abc.HalfCloseableStream, client_pending: bytes,
                 upstream: trio.abc.HalfCloseableStream, upstream_pending: bytes,
                 *, half_close_grace: float = HALF_CLOSE_GRACE) -> None:
    """Copy bytes both ways until both sides are done. One chunk in flight per direction, so a slow
    reader slows the writer through TCP. A clean end of one side is passed on as a half-close and
    the other side gets `half_close_grace` to finish; a broken side ends both at once."""
    async with trio.open_nursery() as nursery:

        async def pump(source: trio.abc.HalfCloseableStream, sink: trio.abc.HalfCloseableStream,
                       pending: bytes) -> None:
            try:
                if pending:
                    await sink.send_all(pending)
                while data := await source.receive_some(SPLICE_RECEIVE_SIZE):
                    await sink.send_all(data)
                await sink.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                nursery.cancel_scope.cancel()
                return
            nursery.cancel_scope.deadline = min(nursery.cancel_scope.deadline,
                                                trio.current_time() + half_close_grace)

        nursery.start_soon(pump, client, upstream, client_pending)
        nursery.start_soon(pump, upstream, client, upstream_pending)


@dataclass
class IdeProxy:
    pool: UpstreamPool
    authorize: IdeAuthorize
    still_allowed: IdeStillAllowed
    activity: IdeActivity
    ide_domain: str
    cookie_secure: bool
    public_scheme: str = "http"
    # The IDE cookie is Secure when configured so (cookie_secure), or, unless IDE_COOKIE_SECURE=0 said
    # otherwise (cookie_secure_fixed), when a trusted proxy says the browser spoke HTTPS to it.
    cookie_secure_fixed: bool = False
    trusted_proxies: tuple[Network, ...] = ()
    access_check_interval: float = ACCESS_CHECK_INTERVAL
    _websockets: dict[trio.CancelScope, IdeGrant] = field(default_factory=dict)  # open here, by grant

    def __post_init__(self) -> None:
        self._host_pattern = ide_host_pattern(self.ide_domain)

    def _cookie_secure(self, request: Request) -> bool:
        if self.cookie_secure or self.cookie_secure_fixed:
            return self.cookie_secure
        return forwarded_https(request.client, header_pairs(request.headers), self.trusted_proxies)

    @contextmanager
    def holding(self, grant: IdeGrant) -> Iterator[None]:
        """The lifetime of one open websocket under `grant`: it ends early (cancelled) when `revoke`
        names the grant or the periodic re-check no longer allows it."""
        with trio.CancelScope() as scope:
            self._websockets[scope] = grant
            try:
                yield
            finally:
                del self._websockets[scope]

    @property
    def open_websockets(self) -> int:
        return len(self._websockets)

    def revoke(self, revocation: IdeRevocation) -> int:
        """Cut every websocket this replica holds whose grant `revocation` matches; how many."""
        cut = [scope for scope, grant in self._websockets.items() if revocation.matches(grant)]
        for scope in cut:
            scope.cancel()
        return len(cut)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Re-check the grant of every open websocket each `access_check_interval`; cut those the rule
        no longer allows. A failed check (the database away) cuts nothing."""
        task_status.started()
        while True:
            await trio.sleep(self.access_check_interval)
            for scope, grant in list(self._websockets.items()):
                try:
                    allowed = await self.still_allowed(grant)
                except Exception:
                    log.exception("could not re-check an IDE websocket's access")
                    continue
                if not allowed:
                    scope.cancel()

    def host_route(self, request: Request) -> tuple[Handler, dict[str, str], str] | None:
        """For the front server's router: every request to an IDE host name is the proxy's."""
        target = resolve_host(request, self._host_pattern)
        if target is None:
            return None
        return self.handle_host, {"id": str(target.instance_id)}, "ide.host"

    async def handle_path(self, exchange: Exchange, params: dict[str, str]) -> None:
        target = resolve_path(exchange.request)
        if target is None:
            raise ApiError(404, "NOT_FOUND")
        await self.serve(exchange, target)

    async def handle_host(self, exchange: Exchange, params: dict[str, str]) -> None:
        target = resolve_host(exchange.request, self._host_pattern)
        if target is None or not target.path.startswith("/"):
            raise ApiError(400, "BAD_REQUEST", {"reason": "origin-form request target required"})
        await self.serve(exchange, target)

    async def serve(self, exchange: Exchange, target: IdeTarget) -> None:
        request = exchange.request
        websocket = is_websocket_upgrade(request)
        credential = credential_of(request, target)
        if credential is None and not target.path:
            await _redirect(exchange, target.location(target.query))
            return
        if credential is None:
            raise ApiError(401, "UNAUTHORIZED", {"reason": "IDE session required: open the IDE link again"})
        grant = await self.authorize(credential, target.instance_id)
        if credential.kind == "link" and not websocket:
            cookie = session_cookie(target, grant, secure=self._cookie_secure(request))
            await _redirect(exchange, target.location(without_token(target.query)), [(b"set-cookie", cookie)])
            return
        if not target.path:
            await _redirect(exchange, target.location(target.query))
            return
        self.activity.request_seen(target.instance_id)
        if websocket:
            if not origin_matches(request):
                raise ApiError(403, "ORIGIN_MISMATCH", {"reason": "websocket Origin does not match the host"})
            await self.forward_websocket(exchange, target, grant)
        else:
            await self.forward_http(exchange, target, grant)

    async def forward_http(self, exchange: Exchange, target: IdeTarget, grant: IdeGrant) -> None:
        request = exchange.request
        headers = upstream_headers(request, self.public_scheme)
        body = None
        if declared_length(exchange) is not None:
            body = exchange.body()
        elif request.header(b"transfer-encoding") is not None:
            headers.append((b"transfer-encoding", b"chunked"))
            body = exchange.body()
        try:
            async with self.pool.request(grant.host, grant.port, request.method, target.upstream_target,
                                         headers, body) as response:
                await exchange.send_head(response.status, ide_response_headers(response.headers, target))
                async for chunk in response.body(idle_timeout=STALL_TIMEOUT):
                    await exchange.send_data(chunk)
                await exchange.end()
        except UpstreamError as exc:
            if exchange.headers_sent:
                raise  # the client connection is dropped: a cut body must not look complete
            raise _unavailable(exc) from exc

    async def forward_websocket(self, exchange: Exchange, target: IdeTarget, grant: IdeGrant) -> None:
        headers = upstream_headers(exchange.request, self.public_scheme)
        headers += [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
        try:
            async with self.pool.request(grant.host, grant.port, "GET", target.upstream_target,
                                         headers) as response:
                if response.status != 101:  # e.g. code-server refusing: the browser sees why
                    await exchange.send_head(response.status, ide_response_headers(response.headers, target))
                    async for chunk in response.body(idle_timeout=STALL_TIMEOUT):
                        await exchange.send_data(chunk)
                    await exchange.end()
                    return
                upstream, upstream_pending = response.take_over()
        except UpstreamError as exc:
            if exchange.headers_sent:
                raise
            raise _unavailable(exc) from exc
        try:
            client, client_pending = exchange.take_over()
            exchange.status = 101
            await client.send_all(switching_protocols_head(response, target))
            self.activity.websocket_opened(target.instance_id)
            try:
                with self.holding(grant):
                    await splice(client, client_pending, upstream, upstream_pending)
            finally:
                self.activity.websocket_closed(target.instance_id)
        finally:
            with trio.CancelScope(shield=True):
                await upstream.aclose()


def _unavailable(exc: UpstreamError) -> ApiError:
    if isinstance(exc, UpstreamTimeout):
        return ApiError(504, "IDE_TIMEOUT", {"reason": str(exc)})
    reason = str(exc) if isinstance(exc, UpstreamBroken) else "the IDE is not running or not reachable"
    return ApiError(502, "IDE_UNAVAILABLE", {"reason": reason})


async def _redirect(exchange: Exchange, location: str, headers: Headers | None = None) -> None:
    # The redirect that drops a token must not be cached, nor leak the URL it came from.
    await exchange.respond(302, b"", content_type=b"text/plain", headers=[
        (b"location", location.encode("latin-1")), (b"cache-control", b"no-store"),
        (b"referrer-policy", b"no-referrer"), *(headers or [])])
