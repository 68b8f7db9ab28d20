"""A lean HTTP/1.1 server for the simulated fleet: small requests and small answers only, parsed by
llhttp (httptools), with keep-alive and pipelining.

The simulator stands in for thousands of agents on one core, so its cost per request bounds how
large a fleet the bench can poll: h11 in pure Python took about 250 µs of CPU per poll request here,
which capped one simulator process near 4,000 agents at a 5 s interval. The simulator's handlers are
the same (`serve_simulated`, with `Request`-shaped objects and `Response` answers); only the framing
is cheaper. A body is read whole (up to `MAX_BODY`), which is right for the control routes the
simulator serves and wrong for anything else: real agents use `bench.agent.http`."""

from __future__ import annotations

import socket
import struct
import sys
import traceback
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus

import httptools
import trio

from bench.agent.http import AbortConnection, ApiError, ClientDisconnected, Response, error_response

RECEIVE_SIZE = 64 << 10
MAX_BODY = 1 << 20


class SmallRequest:
    """What `serve_simulated` reads from a request, with the body already in hand."""

    __slots__ = ("_stream", "body", "body_complete", "headers", "keep_alive", "method", "path", "query", "target")

    def __init__(self, stream: trio.SocketStream, method: str, target: str, headers: dict[str, str],
                 body: bytes, keep_alive: bool) -> None:
        self._stream = stream
        self.method, self.target, self.headers, self.body = method, target, headers, body
        self.keep_alive = keep_alive
        self.body_complete = True
        raw_path, _, raw_query = target.partition("?")
        self.path = urllib.parse.unquote(raw_path)
        self.query = dict(urllib.parse.parse_qsl(raw_query, keep_blank_values=True)) if raw_query else {}

    async def receive_body(self, limit: int) -> bytes:
        if len(self.body) > limit:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", {"limit": limit})
        return self.body

    async def wait_for_disconnect(self) -> None:
        """Hold the request until the client goes away (a hung agent)."""
        try:
            while await self._stream.receive_some(RECEIVE_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        raise ClientDisconnected("client gave up")


SmallHandler = Callable[[SmallRequest], Awaitable[Response]]


class _Parsed:
    """llhttp's callbacks: complete requests queue up in arrival order (pipelining)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[SmallRequest] = deque()
        self._url = bytearray()
        self._headers: dict[str, str] = {}
        self._body = bytearray()

    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = {}
        self._body = bytearray()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_body(self, data: bytes) -> None:
        self._body += data
        if len(self._body) > MAX_BODY:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", {"limit": MAX_BODY})

    def on_message_complete(self) -> None:
        self.ready.append(SmallRequest(
            self.stream, self.parser.get_method().decode("ascii"), self._url.decode("latin-1"),
            self._headers, bytes(self._body), self.parser.should_keep_alive()))


def encode_response(response: Response, *, head_only: bool, closing: bool) -> bytes:
    body = response.body
    if not isinstance(body, bytes):
        raise TypeError("the small server answers with bytes bodies only")
    phrase = HTTPStatus(response.status).phrase if response.status in HTTPStatus._value2member_map_ else ""
    lines = [f"HTTP/1.1 {response.status} {phrase}"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    lines.append(f"content-length: {len(body)}")
    if closing:
        lines.append("connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


async def serve_small_connection(stream: trio.SocketStream, handler: SmallHandler) -> None:
    """Answer requests on one connection, in order, until the client closes it or asks to."""
    parsed = _Parsed(stream)
    try:
        while True:
            while not parsed.ready:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                try:
                    parsed.parser.feed_data(data)
                except ApiError as error:  # raised in on_body: a body over the limit
                    await stream.send_all(encode_response(error.response(), head_only=False, closing=True))
                    return
                except httptools.HttpParserError as exc:
                    cause = exc.__context__
                    error = cause.response() if isinstance(cause, ApiError) else error_response(
                        400, "BAD_REQUEST", str(exc))
                    await stream.send_all(encode_response(error, head_only=False, closing=True))
                    return
            request = parsed.ready.popleft()
            try:
                response = await handler(request)
            except ApiError as error:
                response = error.response()
            except AbortConnection:
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            except Exception:  # noqa: BLE001 - a handler bug is a 500, not a dead connection task
                traceback.print_exc(file=sys.stderr)
                response = error_response(500, "INTERNAL", None)
            await stream.send_all(encode_response(response, head_only=request.method == "HEAD",
                                                  closing=not request.keep_alive))
            if not request.keep_alive:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, ClientDisconnected):
        pass
    finally:
        await stream.aclose()


async def serve_small(handler: SmallHandler, listeners: Sequence[trio.SocketListener], *,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept connections on `listeners` until cancelled, one task per connection."""

    async def serve(stream: trio.SocketStream) -> None:
        await serve_small_connection(stream, handler)

    await trio.serve_listeners(serve, listeners, task_status=task_status)
