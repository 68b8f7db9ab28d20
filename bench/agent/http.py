"""The reference agent's HTTP/1.1 server: raw trio sockets driven by h11, with keep-alive.

This server is the "direct" baseline of the bench suite, so bodies stream: a request body is read
chunk by chunk as the handler asks for it (TCP flow control is the backpressure), a file body leaves
through sendfile(2) in a worker thread, and a websocket upgrade hands the socket over to
`bench.agent.websocket.WebSocket`. It knows no routes: a handler maps a `Request` to a `Response`
or a `WebsocketUpgrade`.

It must never hold a whole body it was not handed as bytes, and never answer with a traceback: an
`ApiError` becomes the one JSON error envelope `{"error": CODE, "details": ...}`, anything else
a 500 `INTERNAL` — except a name the filesystem cannot hold (ENAMETOOLONG, EINVAL, EILSEQ, an
embedded NUL, a lone surrogate), which is the client's doing: 400 `INVALID_PATH`.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys
import traceback
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import trio
from wsproto.utilities import generate_accept_token

from bench.agent.websocket import INTERNAL_ERROR, WebSocket, WebSocketClosed

RECEIVE_CHUNK = 1 << 20
SENDFILE_CHUNK = 8 << 20
MAX_HEADER_BYTES = 64 << 10
MAX_JSON_BODY = 8 << 20
# An unread request body up to this size is read and dropped so the connection can be reused.
DRAIN_LIMIT = 256 << 10
# Response bodies up to this size leave in one send together with the head.
INLINE_BODY_LIMIT = 256 << 10
DRAIN_SECONDS = 2.0
UNHOLDABLE_NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ})
LINGER_SECONDS = 1.0


def unholdable_name(exc: OSError | ValueError) -> str | None:
    """Why the filesystem refused a client's name, when that is what `exc` says; None otherwise."""
    if isinstance(exc, OSError):
        return os.strerror(exc.errno) if exc.errno in UNHOLDABLE_NAME_ERRNOS and exc.errno else None
    if isinstance(exc, UnicodeEncodeError):
        return "name is not valid UTF-8"
    return "NUL byte in a name" if "embedded null" in str(exc) else None


class ApiError(Exception):
    """A failure the client caused or must know about; becomes the JSON error envelope."""

    def __init__(
        self,
        status: int,
        code: str,
        details: Any = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(f"{status} {code}")
        self.status = status
        self.code = code
        self.details = details
        self.headers = list(headers)

    def response(self) -> Response:
        return error_response(self.status, self.code, self.details, self.headers)


class ClientDisconnected(Exception):
    """The client went away (or broke the framing) before its request body was complete."""


class AbortConnection(Exception):
    """Raised by a handler to drop the connection with a reset instead of answering."""


@dataclass(frozen=True)
class FileSlice:
    """A response body taken from a file with sendfile(2); `len()` is what h11 counts."""

    path: str
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


BodySender = Callable[[bytes | memoryview], Awaitable[None]]


@dataclass(frozen=True)
class StreamBody:
    """A response body of a known length produced on the fly: `produce(send)` calls `send`."""

    length: int
    produce: Callable[[BodySender], Awaitable[None]]


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | FileSlice | StreamBody = b""


def json_response(
    payload: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, [("content-type", "application/json"), *headers], body)


def decode_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "BAD_REQUEST", {"reason": f"invalid JSON: {exc}"}) from exc


def error_response(
    status: int, code: str, details: Any = None, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    return json_response({"error": code, "details": details}, status, headers)


@dataclass(frozen=True)
class WebsocketUpgrade:
    """Returned by a handler to accept a websocket; `run` owns the socket until it returns."""

    run: Callable[[WebSocket], Awaitable[None]]
    subprotocol: str | None = None


Outcome = Response | WebsocketUpgrade
Handler = Callable[["Request"], Awaitable[Outcome]]


class Request:
    """One request: head parsed, body still on the wire until a `receive_*` method reads it."""

    def __init__(self, session: _Session, event: h11.Request) -> None:
        self._session = session
        self.method = event.method.decode("ascii")
        self.target = event.target.decode("latin-1")
        raw_path, _, self.raw_query = self.target.partition("?")
        self.path = urllib.parse.unquote(raw_path)
        self.query: dict[str, str] = {}
        for name, value in urllib.parse.parse_qsl(self.raw_query, keep_blank_values=True):
            self.query.setdefault(name, value)
        self.header_list = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
        self.headers: dict[str, str] = {}
        for name, value in self.header_list:
            self.headers[name] = f"{self.headers[name]}, {value}" if name in self.headers else value
        self.params: dict[str, str] = {}
        self.body_complete = False

    @property
    def is_websocket_upgrade(self) -> bool:
        return (
            self.method == "GET"
            and self.headers.get("upgrade", "").lower() == "websocket"
            and "upgrade" in self.headers.get("connection", "").lower()
        )

    async def receive_chunk(self) -> bytes | None:
        """The next piece of the body as it arrives, or None once the body is complete."""
        while not self.body_complete:
            try:
                event = await self._session.next_event()
            except h11.RemoteProtocolError as exc:
                raise ClientDisconnected(str(exc)) from exc
            if type(event) is h11.Data:
                return event.data
            if type(event) is h11.EndOfMessage:
                self.body_complete = True
            else:
                raise ClientDisconnected(f"unexpected {type(event).__name__}")
        return None

    async def wait_for_disconnect(self) -> None:
        """Hold the request until the client goes away (for hung-agent simulation).

        Whatever the client sends meanwhile is dropped; raises `ClientDisconnected` at the end so
        the connection is closed, never reused.
        """
        stream = self._session.stream
        try:
            while await stream.receive_some(RECEIVE_CHUNK):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        raise ClientDisconnected("client gave up")

    async def receive_body(self, limit: int) -> bytes:
        """The whole body, refused with 413 past `limit` bytes (for small JSON bodies only)."""
        parts = bytearray()
        while (chunk := await self.receive_chunk()) is not None:
            parts += chunk
            if len(parts) > limit:
                raise ApiError(413, "PAYLOAD_TOO_LARGE", {"limit": limit})
        return bytes(parts)


class _Session:
    """One client connection: the h11 state machine plus the socket it drives."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                await self.stream.send_all(
                    self.conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            try:
                data = await self.stream.receive_some(RECEIVE_CHUNK)
            except trio.BrokenResourceError:
                data = b""
            self.conn.receive_data(data)

    async def run(self, handler: Handler) -> None:
        while True:
            try:
                event = await self.next_event()
            except h11.RemoteProtocolError as exc:
                if self.conn.our_state is h11.SEND_RESPONSE or self.conn.our_state is h11.IDLE:
                    response = error_response(exc.error_status_hint, "BAD_REQUEST", str(exc))
                    await self.send_response(response, head_only=False, closing=True)
                return
            if type(event) is not h11.Request:
                return
            request = Request(self, event)
            outcome = await self.dispatch(handler, request)
            if outcome is None:
                return
            if isinstance(outcome, WebsocketUpgrade):
                await self.upgrade(request, outcome)
                return
            if not await self.respond(request, outcome):
                return
            self.conn.start_next_cycle()

    async def dispatch(self, handler: Handler, request: Request) -> Outcome | None:
        try:
            return await handler(request)
        except ApiError as error:
            return error.response()
        except AbortConnection:
            self.reset()
            return None
        except ClientDisconnected:
            raise
        except (OSError, ValueError) as exc:
            reason = unholdable_name(exc)
            if reason is None:
                traceback.print_exc(file=sys.stderr)
                return error_response(500, "INTERNAL", None)
            return error_response(400, "INVALID_PATH", {"reason": reason})
        except Exception:  # noqa: BLE001 - a handler bug is a 500, not a dead connection task
            traceback.print_exc(file=sys.stderr)
            return error_response(500, "INTERNAL", None)

    async def respond(self, request: Request, response: Response) -> bool:
        """Send `response`; True when the connection can carry another request."""
        closing = not request.body_complete and not self.body_is_drainable(request)
        await self.send_response(response, head_only=request.method == "HEAD", closing=closing)
        if closing:
            await self.linger()
            return False
        if not request.body_complete and not await self.drain(request):
            await self.linger()
            return False
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def drain(self, request: Request) -> bool:
        """Read and drop the rest of a small unread body; False if it is too big or too slow."""
        drained = 0
        with trio.move_on_after(DRAIN_SECONDS):
            while (chunk := await request.receive_chunk()) is not None:
                drained += len(chunk)
                if drained > DRAIN_LIMIT:
                    return False
        return request.body_complete

    def body_is_drainable(self, request: Request) -> bool:
        if self.conn.client_is_waiting_for_100_continue:
            return False
        length = request.headers.get("content-length")
        return length is None or (length.isdigit() and int(length) <= DRAIN_LIMIT)

    async def send_response(self, response: Response, *, head_only: bool, closing: bool) -> None:
        body = response.body
        headers = [*response.headers, ("content-length", str(len_of(body)))]
        if closing:
            headers.append(("connection", "close"))
        head = self.conn.send(h11.Response(status_code=response.status, headers=headers))
        assert head is not None
        if head_only or not len_of(body):
            await self.stream.send_all(head + self.end_of_message())
        elif isinstance(body, bytes) and len(body) <= INLINE_BODY_LIMIT:
            data = self.conn.send(h11.Data(data=body))
            assert data is not None
            await self.stream.send_all(head + data + self.end_of_message())
        else:
            await self.stream.send_all(head)
            await self.send_body(body)
            await self.stream.send_all(self.end_of_message())

    def end_of_message(self) -> bytes:
        tail = self.conn.send(h11.EndOfMessage())
        assert tail is not None
        return tail

    async def send_body(self, body: bytes | FileSlice | StreamBody) -> None:
        if isinstance(body, StreamBody):
            await body.produce(self.send_data)
        elif isinstance(body, FileSlice):
            # h11 documents pass-through objects with a len() for sendfile.
            self.conn.send_with_data_passthrough(h11.Data(data=body))  # type: ignore[arg-type]
            await self.sendfile(body)
        else:
            await self.send_data(body)

    async def send_data(self, data: bytes | memoryview) -> None:
        pieces = self.conn.send_with_data_passthrough(h11.Data(data=data))  # type: ignore[arg-type]
        for piece in pieces or ():
            await self.stream.send_all(piece)

    async def sendfile(self, body: FileSlice) -> None:
        sock = self.stream.socket
        with await trio.to_thread.run_sync(open, body.path, "rb") as source:
            offset, remaining = body.offset, body.length
            while remaining:
                try:
                    sent = await trio.to_thread.run_sync(
                        os.sendfile, sock.fileno(), source.fileno(), offset,
                        min(remaining, SENDFILE_CHUNK),
                    )
                except BlockingIOError:
                    await sock.wait_writable()
                    continue
                if sent == 0:
                    # The file shrank under us: the promised Content-Length cannot be met.
                    raise trio.BrokenResourceError(f"{body.path} shrank during download")
                offset += sent
                remaining -= sent

    async def upgrade(self, request: Request, upgrade: WebsocketUpgrade) -> None:
        key = request.headers.get("sec-websocket-key")
        if not request.is_websocket_upgrade or not key:
            response = error_response(426, "UPGRADE_REQUIRED", "websocket upgrade expected",
                                      [("upgrade", "websocket")])
            await self.respond(request, response)
            return
        while not request.body_complete:
            await request.receive_chunk()
        headers = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", generate_accept_token(key.encode()).decode()),
        ]
        if upgrade.subprotocol:
            headers.append(("sec-websocket-protocol", upgrade.subprotocol))
        handshake = self.conn.send(h11.InformationalResponse(status_code=101, headers=headers))
        assert handshake is not None
        await self.stream.send_all(handshake)
        buffered, _ = self.conn.trailing_data
        websocket = WebSocket(self.stream, buffered)
        try:
            await upgrade.run(websocket)
        except (WebSocketClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # noqa: BLE001 - a handler bug closes this websocket with 1011
            traceback.print_exc(file=sys.stderr)
            await websocket.close(INTERNAL_ERROR, "agent error")
        finally:
            with trio.CancelScope(shield=True):
                await websocket.finish()

    async def linger(self) -> None:
        """Half-close and read a little, so an unread request body does not reset our answer."""
        try:
            await self.stream.send_eof()
            with trio.move_on_after(LINGER_SECONDS):
                while await self.stream.receive_some(RECEIVE_CHUNK):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def reset(self) -> None:
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def len_of(body: bytes | FileSlice | StreamBody) -> int:
    return body.length if isinstance(body, StreamBody) else len(body)


async def serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    """Serve HTTP/1.1 requests on one accepted connection until either side closes it."""
    session = _Session(stream)
    try:
        await session.run(handler)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ClientDisconnected):
        pass
    except h11.ProtocolError:
        pass
    except Exception:  # noqa: BLE001 - one broken connection must not take the listener down
        traceback.print_exc(file=sys.stderr)
    finally:
        await stream.aclose()


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """TCP listeners on `host:port` (port 0 picks a free one)."""
    return await trio.open_tcp_listeners(port, host=host)


def bound_port(listeners: Sequence[trio.SocketListener]) -> int:
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def serve_listeners(
    handler: Handler,
    listeners: Sequence[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on `listeners` until cancelled, one task per connection."""

    async def serve(stream: trio.SocketStream) -> None:
        await serve_connection(stream, handler)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, serve, listeners)
        task_status.started()
