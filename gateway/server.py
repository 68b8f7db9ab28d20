"""The front server: one listener for everything, speaking HTTP/1.1 with h11.

Theory of operation. Every request head is read here and offered to the data-plane router. If it
owns the route (file and backup streams, the console websocket, the IDE proxy), the request is served
right here: bodies flow chunk by chunk with TCP backpressure and nothing is ever held whole. Every
other request is passed, as an ASGI http request, to the Quart-Trio control app (gateway/asgi.py);
the next request on the same keep-alive connection is routed afresh. Hypercorn contributes its
configuration (hypercorn.toml: binds, keep-alive, timeouts) and the app's lifespan. Measured on this
machine a raw trio+h11 path serves ~4x the small requests of Hypercorn and moves ~1.4x the bulk bytes;
handing whole connections to Hypercorn was tried and fails, because clients reuse a keep-alive
connection for both kinds of request.

The edge holds here, for every route alike (h11 parses; this file adds what h11 leaves to its user):
- the header section is limited to hypercorn.toml's `h11_max_incomplete_size` by the bytes received,
  however they were split into reads (h11 checks only a head still incomplete, so a big head arriving
  in one read would pass it; heads are also read at most one byte past the limit at a time);
- a request with both Content-Length and Transfer-Encoding (or Transfer-Encoding in HTTP/1.0) is
  refused with 400 and the connection closed (RFC 9112 §6.1: h11 would let Transfer-Encoding win and
  keep the connection, so a request hidden in the body would be served next);
- a transfer coding other than chunked is 501 UNSUPPORTED_TRANSFER_CODING, any HTTP version but 1.0
  and 1.1 (the HTTP/2 preface `PRI * HTTP/2.0`) 505 HTTP_VERSION_NOT_SUPPORTED;
- a body whose chunked framing is broken is 400 BAD_FRAMING wherever it is read (the data plane and
  the ASGI handoff), and the connection is closed.
Each refusal is the error envelope with `connection: close`; a refused request that did parse gets its
access-log line and metric (route `edge`); nothing about it is logged louder.

Never buffer a body here, never let a handler's failure escape its connection, and never leave a
socket without a timeout on the read that waits for the client.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import unquote

import h11
import trio
from hypercorn.config import Config as HypercornConfig

from .errors import ApiError, envelope_bytes
from .fdio import Splice
from .forwarded import Network, header_pairs, real_client
from .logs import log_request
from .metrics import Metrics

log = logging.getLogger("zlh.server")

RECEIVE_SIZE = 256 * 1024
COALESCE_LIMIT = 64 * 1024
SUPPORTED_VERSIONS = (b"1.0", b"1.1")
CODE_FOR_REFUSAL = {400: "BAD_REQUEST", 431: "REQUEST_HEADER_FIELDS_TOO_LARGE", 501: "UNSUPPORTED_TRANSFER_CODING",
                    505: "HTTP_VERSION_NOT_SUPPORTED"}
CLOSE = {"connection": "close"}

Headers = list[tuple[bytes, bytes]]


@dataclass
class Request:
    """A request head as the data plane sees it. Header names are lower-case bytes."""

    method: str
    target: str
    path: str
    query: str
    headers: Headers
    http_version: bytes
    client: str | None
    scheme: str

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def host(self) -> str:
        return (self.header(b"host") or b"").decode("latin-1")


class ClientGone(Exception):
    """The client went away mid-exchange."""


def bad_framing(exc: h11.RemoteProtocolError) -> ApiError:
    """A body h11 cannot frame (a chunk size `zz`, `-1`, 2^96, a chunk line past the limit): the
    client's error, answered once, and the connection is not reused (there is no next request to find)."""
    status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
    return ApiError(status, "BAD_FRAMING" if status == 400 else CODE_FOR_REFUSAL[431],
                    {"reason": "the request body's framing is invalid"}, headers=CLOSE)


@dataclass
class Exchange:
    """One request/response on a data-plane connection: the handler's whole view of the socket."""

    request: Request
    _conn: h11.Connection
    _stream: trio.abc.Stream
    route: str = "data-plane"
    status: int = 0
    upgraded: bool = False
    raw: bytes = b""  # every byte read for this request so far (head included), for protocol switches
    _held: bytes = b""  # a response head waiting to leave with the first body bytes
    _body_done: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def headers_sent(self) -> bool:
        return self.status != 0

    async def body(self) -> AsyncIterator[bytes]:
        """The request body, chunk by chunk as it arrives; reading is what pulls it off the socket.
        Broken framing raises the ApiError `bad_framing` gives (a 400 if nothing was answered yet)."""
        while not self._body_done:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise bad_framing(exc) from None
            if event is h11.NEED_DATA:
                try:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ClientGone() from exc
                if not data:
                    raise ClientGone()
                self._conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like
                continue
            if isinstance(event, h11.Data):
                yield event.data
            elif isinstance(event, h11.EndOfMessage):
                self._body_done = True
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone()

    async def send_head(self, status: int, headers: Iterable[tuple[bytes | str, bytes | str]]) -> None:
        """The head is held until the first body bytes (or the end), so that a small answer leaves
        in one write: one syscall instead of three is most of the cost of a small proxied request."""
        self.status = status
        self._held = self._framed(h11.Response(status_code=status, headers=list(headers)))  # type: ignore[arg-type]  # h11 takes mixed bytes/str pairs

    async def send_data(self, data: bytes | bytearray | memoryview | Splice) -> None:
        if not data:
            return
        pieces = self._framed_pieces(h11.Data(data=data))  # type: ignore[arg-type]  # bytes-like or a Splice, passed through
        if self._held and len(data) <= COALESCE_LIMIT:
            pieces = [self._held + b"".join(pieces)]
        elif self._held:
            pieces = [self._held, *pieces]
        self._held = b""
        await self._write(pieces)

    async def end(self) -> None:
        tail = self._framed(h11.EndOfMessage())
        pieces = [self._held + tail]
        self._held = b""
        await self._write(pieces)

    async def respond(self, status: int, body: bytes, content_type: bytes = b"application/json",
                      headers: Iterable[tuple[bytes | str, bytes | str]] = ()) -> None:
        await self.send_head(
            status, [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]
        )
        await self.send_data(body)
        await self.end()

    async def respond_error(self, error: ApiError) -> None:
        await self.respond(error.status, envelope_bytes(error.code, error.details), headers=error.headers.items())

    def take_over(self) -> tuple[trio.SocketStream, bytes]:
        """For protocol switches: the raw socket plus any bytes already read past the request head.
        After this the connection is the caller's (the front server closes it when the handler ends)."""
        assert not self._held, "a protocol switch after a held response head"
        self.upgraded = True
        trailing, _closed = self._conn.trailing_data
        return self._stream, bytes(trailing)  # type: ignore[return-value]

    def _framed(self, event: Any) -> bytes:
        return b"".join(self._framed_pieces(event))

    def _framed_pieces(self, event: Any) -> list[Any]:
        # Body bytes pass through uncopied (h11 only adds framing around them).
        return list(self._conn.send_with_data_passthrough(event) or ())

    async def _write(self, pieces: list[Any]) -> None:
        try:
            for piece in pieces:
                if isinstance(piece, Splice):  # a zero-copy body run (gateway/fdio.py): it writes itself
                    await piece.write_to(self._stream)
                elif piece:
                    await self._stream.send_all(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientGone() from exc


Handler = Callable[[Exchange, dict[str, str]], Awaitable[None]]
Router = Callable[[Request], tuple[Handler, dict[str, str], str] | None]


@dataclass
class FrontServer:
    """Serves the data plane natively and hands every other connection to Hypercorn."""

    router: Router
    control: Handler  # serves every request the data plane does not own (gateway/asgi.py)
    hypercorn: HypercornConfig
    metrics: Metrics
    trusted_proxies: tuple[Network, ...] = ()  # the access log names the client behind these (gateway/forwarded.py)
    _idle: set[trio.CancelScope] = field(default_factory=set)
    _closing: bool = False

    async def serve(self, shutdown: trio.Event, *,
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept until `shutdown` is set, then stop accepting, close idle keep-alive connections and
        give in-flight exchanges the graceful window before cancelling them."""
        sockets = self.hypercorn.create_sockets()
        listeners = []
        binds = []
        for sock in sockets.insecure_sockets:
            sock.listen(self.hypercorn.backlog)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            host, port = sock.getsockname()[:2]
            binds.append(f"http://{'[' + host + ']' if ':' in host else host}:{port}")
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptor:
                await acceptor.start(partial(trio.serve_listeners, self._connection, listeners,
                                             handler_nursery=connections))
                task_status.started(binds)
                await shutdown.wait()
                acceptor.cancel_scope.cancel()
            self._closing = True
            for scope in list(self._idle):
                scope.cancel()
            connections.cancel_scope.deadline = trio.current_time() + self.hypercorn.graceful_timeout

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
            client = f"{peer[0]}:{peer[1]}"
        except OSError:
            return
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.hypercorn.h11_max_incomplete_size)
        try:
            await self._serve_exchanges(stream, conn, client)
            if conn.their_state in (h11.SEND_BODY, h11.ERROR) and conn.our_state in (h11.DONE, h11.MUST_CLOSE):
                await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ClientGone, trio.TooSlowError,
                h11.ProtocolError):
            pass
        except ApiError as error:
            # The client's fault, found after the answer had begun (a body's framing broke): the
            # connection is dropped, with one line and no traceback.
            log.warning("connection from %s dropped mid-response: %s", client, error.code)
        except Exception:
            # A failure after the response head went out: the only honest signal left is to drop
            # the connection, so the client sees a broken body rather than a short "complete" one.
            log.warning("connection from %s aborted mid-response", client, exc_info=True)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_exchanges(self, stream: trio.SocketStream, conn: h11.Connection, client: str) -> None:
        first = True
        while not self._closing:
            seen = bytearray(conn.trailing_data[0])
            with trio.CancelScope() as idle:
                if not first and not seen:
                    self._idle.add(idle)
                try:
                    event = await self._read_head(stream, conn, seen, first, client)
                finally:
                    self._idle.discard(idle)
            if idle.cancelled_caught:
                return
            first = False
            if event is None:
                return
            request = _request_from(event, client)
            match = self.router(request)
            handler, params, route = match if match is not None else (self.control, {}, "control")
            exchange = Exchange(request, conn, stream, route=route, raw=bytes(seen))
            started = time.perf_counter()
            try:
                await handler(exchange, params)
            except ApiError as error:
                if exchange.headers_sent:
                    raise
                await exchange.respond_error(error)
            except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
                exchange.status = exchange.status or 499
                raise
            except Exception:
                if exchange.headers_sent:
                    raise
                log.exception("data-plane handler failed on %s", route)
                await exchange.respond_error(ApiError(500))
            finally:
                if match is not None:  # the control app logs and counts its own requests
                    duration = time.perf_counter() - started
                    self.metrics.observe_request(route, request.method, exchange.status or 499, duration)
                    log_request(request.method, request.path, request.query, exchange.status or 499, duration,
                                real_client(client, header_pairs(request.headers), self.trusted_proxies), route,
                                peer=client)
            if exchange.upgraded or conn.our_state is h11.MUST_CLOSE:
                return
            if conn.their_state is h11.SEND_BODY and not await _discard_rest_of_body(stream, conn):
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_head(self, stream: trio.SocketStream, conn: h11.Connection, seen: bytearray,
                         first: bool, client: str) -> h11.Request | None:
        """The next request head, or None when the connection is over (the client left, or the head
        was refused and answered here)."""
        timeout = self.hypercorn.read_timeout if first else self.hypercorn.keep_alive_timeout
        limit = self.hypercorn.h11_max_incomplete_size
        with trio.fail_after(timeout or math.inf):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    await _reject(stream, conn, status, CODE_FOR_REFUSAL.get(status, "BAD_REQUEST"),
                                  "not a valid HTTP/1.1 request head" if status == 400 else None)
                    return None
                if event is h11.NEED_DATA:
                    # Never more than one byte past the limit while a head is incomplete.
                    data = await stream.receive_some(max(1, min(RECEIVE_SIZE, limit + 1 - len(seen))))
                    if not data:
                        return None
                    seen.extend(data)
                    conn.receive_data(data)
                    continue
                if not isinstance(event, h11.Request):
                    return None
                refusal = _refusal(event, len(seen) - len(conn.trailing_data[0]), limit)
                if refusal is None:
                    return event
                await _reject(stream, conn, *refusal)
                request = _request_from(event, client)
                self.metrics.observe_request("edge", request.method, refusal[0], 0.0)
                log_request(request.method, request.path, request.query, refusal[0], 0.0, client, "edge")
                return None


async def _linger(stream: trio.SocketStream, seconds: float = 1.0, limit: int = 4 * 1024 * 1024) -> None:
    """Close after an answer the client may still be sending a body behind: end our side first and
    read (and drop) what is in flight for a moment, so the close does not become a reset that takes
    the answer with it before the client read it."""
    drained = 0
    with trio.move_on_after(seconds):
        try:
            await stream.send_eof()
            while drained <= limit and (data := await stream.receive_some(RECEIVE_SIZE)):
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _refusal(event: h11.Request, head_bytes: int, limit: int) -> tuple[int, str, str] | None:
    """What h11 lets through that this server refuses: (status, code, reason), or None."""
    if head_bytes > limit:
        return 431, CODE_FOR_REFUSAL[431], f"the header section is limited to {limit} bytes"
    if event.http_version not in SUPPORTED_VERSIONS:
        return 505, CODE_FOR_REFUSAL[505], "HTTP/1.1 only (no HTTP/2 on this listener)"
    names = {name for name, _ in event.headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return 400, "BAD_FRAMING", "both Content-Length and Transfer-Encoding"
    if b"transfer-encoding" in names and event.http_version == b"1.0":  # RFC 9112 §6.1: faulty framing
        return 400, "BAD_FRAMING", "Transfer-Encoding in an HTTP/1.0 request"
    return None


async def _discard_rest_of_body(stream: trio.SocketStream, conn: h11.Connection,
                                limit: int = 256 * 1024, timeout: float = 2.0) -> bool:
    """After an answer that did not need the request body (a GET's empty body, an early error), read
    what is left of it so the connection can be reused; give up (and close) past a small limit."""
    drained = 0
    with trio.move_on_after(timeout):
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return False
            if isinstance(event, h11.EndOfMessage):
                return True
            if isinstance(event, h11.Data):
                drained += len(event.data)
            elif event is h11.NEED_DATA:
                if drained > limit:
                    return False
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return False
                conn.receive_data(data)
            else:
                return False
    return False


async def _reject(stream: trio.SocketStream, conn: h11.Connection, status: int, code: str,
                  reason: str | None) -> None:
    """Answer a refused head in the envelope, in one write, and leave the connection to be closed."""
    body = envelope_bytes(code, {"reason": reason} if reason else None)
    head = h11.Response(status_code=status, headers=[(b"content-type", b"application/json"),
                                                     (b"content-length", str(len(body)).encode()),
                                                     (b"connection", b"close")])
    try:
        answer = b"".join(conn.send(event) or b"" for event in (head, h11.Data(data=body), h11.EndOfMessage()))
        await stream.send_all(answer)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _request_from(event: h11.Request, client: str | None) -> Request:
    target = event.target.decode("latin-1")
    raw_path, _, query = target.partition("?")
    return Request(
        method=event.method.decode("ascii"),
        target=target,
        path=unquote(raw_path),
        query=query,
        headers=[(k.lower(), v) for k, v in event.headers],
        http_version=event.http_version,
        client=client,
        scheme="http",
    )
