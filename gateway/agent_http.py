"""HTTP/1.1 for the agent client's small calls: whole JSON answers over keep-alive connections, one
idle list per agent, answers parsed by llhttp (httptools, the parser uvicorn uses).

The poller makes two of these calls per agent per interval, so at thousands of agents the parsing is
most of the gateway's work: h11 in pure Python cost about 150 µs of CPU per call here, llhttp a tenth
of that; the socket is read and written directly (gateway/fdio.py). Streams, uploads and protocol
upgrades stay on `gateway/upstream.py`; nothing here holds more than `limit` bytes of an answer.
Every call is bounded by the caller's timeout. The head is written by hand, so its target and
headers are checked first (gateway/outbound.py): a CR LF in a target would split the request."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import httptools
import trio

from . import fdio
from .outbound import check_request
from .upstream import UpstreamBroken, UpstreamError, open_stream, take_idle

RECEIVE_SIZE = 64 * 1024


class _Answer:
    """llhttp's callbacks for one response: the status, the body, and whether it ended."""

    __slots__ = ("body", "complete", "framed", "keep_alive", "limit", "parser", "too_big")

    def __init__(self, limit: int) -> None:
        self.body = bytearray()
        self.complete = False
        self.framed = False  # Content-Length or chunked: EOF before the end is a broken answer
        self.keep_alive = False
        self.limit = limit
        self.too_big = False
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, _value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # llhttp answers this only until the end

    def on_body(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > self.limit:
            self.too_big = True
            raise UpstreamError("agent answer larger than expected")

    def on_message_complete(self) -> None:
        self.complete = True


@dataclass
class SmallCallPool:
    connect_timeout: float = 5.0
    max_idle_per_host: int = 8
    _idle: dict[tuple[str, int], list[trio.SocketStream]] = field(default_factory=lambda: defaultdict(list))

    async def call(self, host: str, port: int, method: str, target: str, headers: list[tuple[bytes, bytes]],
                   body: bytes | None, *, limit: int) -> tuple[int, bytes]:
        """One request and its whole answer: (status, body). Raises UpstreamError for anything that
        is not a complete HTTP answer, OutboundRefused (before connecting) for a target or header
        that would not go out as one well-formed request; the caller bounds the time."""
        check_request(target, headers)
        stream = await self._connect(host, port)
        reusable = False
        try:
            head = [f"{method} {target} HTTP/1.1\r\nhost: {host}:{port}\r\n".encode()]
            head += [name + b": " + value + b"\r\n" for name, value in headers]
            if body is not None:
                head.append(b"content-length: %d\r\n" % len(body))
            head.append(b"\r\n")
            if body:
                head.append(body)
            try:
                await fdio.send_all(stream, b"".join(head))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamBroken(str(exc)) from exc
            answer = _Answer(limit)
            parser = answer.parser
            while not answer.complete:
                try:
                    data = await fdio.receive_some(stream, RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise UpstreamBroken(str(exc)) from exc
                if not data:
                    if answer.framed or not _started(parser):
                        raise UpstreamBroken("agent closed the connection before the answer ended")
                    break  # an answer delimited by the end of the connection
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    if answer.too_big:
                        raise UpstreamError("agent answer larger than expected") from exc
                    raise UpstreamBroken(f"not an HTTP answer: {exc}") from exc
            reusable = answer.complete and answer.keep_alive
            return parser.get_status_code(), bytes(answer.body)
        finally:
            idle = self._idle[(host, port)]
            if reusable and len(idle) < self.max_idle_per_host:
                idle.append(stream)
            else:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _connect(self, host: str, port: int) -> trio.SocketStream:
        stream = await take_idle(self._idle[(host, port)], lambda kept: kept)
        return stream if stream is not None else await open_stream(host, port, self.connect_timeout)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for stream in idle:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
        self._idle.clear()


def _started(parser: httptools.HttpResponseParser) -> bool:
    try:
        return bool(parser.get_status_code())
    except httptools.HttpParserError:
        return False
