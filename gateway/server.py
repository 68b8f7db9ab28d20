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
from .logs import log_request
from .metrics import Metrics

log = logging.getLogger("zlh.server")

RECEIVE_SIZE = 256 * 1024
COALESCE_LIMIT = 64 * 1024
MAX_HEAD_BYTES = 32 * 1024

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
        """The request body, chunk by chunk as it arrives; reading is what pulls it off the socket."""
        while not self._body_done:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ClientGone() from exc
                if not data:
                    raise ClientGone()
                self._conn.receive_data(data)
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
        self._held = self._framed(h11.Response(status_code=status, headers=list(headers)))

    async def send_data(self, data: bytes | bytearray | memoryview | Splice) -> None:
        if not data:
            return
        pieces = self._framed_pieces(h11.Data(data=data))
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
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            await self._serve_exchanges(stream, conn, client)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ClientGone, trio.TooSlowError,
                h11.ProtocolError):
            pass
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
                    event = await self._read_head(stream, conn, seen, first)
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
                                client, route)
            if exchange.upgraded or conn.our_state is h11.MUST_CLOSE:
                return
            if conn.their_state is h11.SEND_BODY and not await _discard_rest_of_body(stream, conn):
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_head(self, stream: trio.SocketStream, conn: h11.Connection, seen: bytearray,
                         first: bool) -> h11.Request | None:
        timeout = self.hypercorn.read_timeout if first else self.hypercorn.keep_alive_timeout
        with trio.fail_after(timeout or math.inf):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await _reject(stream, conn, exc)
                    return None
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        return None
                    seen.extend(data)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    return event
                return None


async def _discard_rest_of_body(stream: trio.SocketStream, conn: h11.Connection,
                                limit: int = 256 * 1024, timeout: float = 2.0) -> bool:
    """After an answer that did not need the request body (a GET's empty body, an early error), read
    what is left of it so the connection can be reused; give up (and close) past a small limit."""
    drained = 0
    with trio.move_on_after(timeout):
        while True:
            event = conn.next_event()
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


async def _reject(stream: trio.SocketStream, conn: h11.Connection, exc: h11.RemoteProtocolError) -> None:
    status = exc.error_status_hint
    body = envelope_bytes("BAD_REQUEST" if status == 400 else "REQUEST_HEADER_FIELDS_TOO_LARGE", None)
    try:
        for piece in conn.send_with_data_passthrough(
            h11.Response(status_code=status, headers=[(b"content-type", b"application/json"),
                                                      (b"content-length", str(len(body)).encode()),
                                                      (b"connection", b"close")])
        ) or ():
            await stream.send_all(piece)
        await stream.send_all(body)
    except (h11.LocalProtocolError, trio.BrokenResourceError):
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
