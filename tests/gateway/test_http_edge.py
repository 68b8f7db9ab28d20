"""The front server's HTTP edge (gateway/server.py) on a real socket, spoken to in raw bytes: what h11
lets through and the server must refuse itself — smuggling with Content-Length and Transfer-Encoding,
broken chunked framing on the data plane and through the ASGI handoff, header sections over
hypercorn.toml's limit however they arrive, unknown transfer codings and the HTTP/2 preface. Every
request a handler serves is counted, so "never served" is observed, not assumed."""

from __future__ import annotations

import json
import logging
import re
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypercorn.config import Config as HypercornConfig

from gateway.asgi import asgi_handler
from gateway.metrics import Metrics
from gateway.server import Exchange, FrontServer, Handler, Request

HYPERCORN_TOML = Path(__file__).parent.parent.parent / "hypercorn.toml"
HEAD_LIMIT = tomllib.loads(HYPERCORN_TOML.read_text())["h11_max_incomplete_size"]
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


@dataclass
class Edge:
    port: int
    served: list[str] = field(default_factory=list)  # the path of every request a handler was given

    async def exchange(self, data: bytes, *, pieces: int = 1, timeout: float = 10) -> bytes:
        """Send `data` (in `pieces` writes) and read until the server closes the connection."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        received = bytearray()
        with trio.fail_after(timeout):
            step = -(-len(data) // pieces)
            for at in range(0, len(data), step):
                await stream.send_all(data[at:at + step])
                if pieces > 1:
                    await trio.sleep(0.01)
            while chunk := await stream.receive_some(65536):
                received += chunk
        await stream.aclose()
        return bytes(received)


def statuses(answer: bytes) -> list[int]:
    return [int(status) for status in STATUS_LINE.findall(answer)]


def envelope(answer: bytes) -> dict[str, Any]:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


@pytest.fixture
async def edge(nursery: trio.Nursery) -> AsyncIterator[Edge]:
    """A FrontServer configured from the project's hypercorn.toml: `PUT /stream` is a data-plane route
    that reads its body chunk by chunk, everything else goes to an ASGI app through the handoff."""
    config = HypercornConfig.from_mapping(tomllib.loads(HYPERCORN_TOML.read_text()))
    config.bind = ["127.0.0.1:0"]
    edge = Edge(0)

    async def stream_body(exchange: Exchange, params: dict[str, str]) -> None:
        edge.served.append(exchange.request.path)
        size = 0
        async for chunk in exchange.body():
            size += len(chunk)
        await exchange.respond(200, json.dumps({"size": size}).encode())

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        edge.served.append(scope["path"])
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"size": size}).encode()})

    def router(request: Request) -> tuple[Handler, dict[str, str], str] | None:
        return (stream_body, {}, "stream") if request.path == "/stream" else None

    shutdown = trio.Event()
    server = FrontServer(router, asgi_handler(app), config, Metrics())
    binds = await nursery.start(partial(server.serve, shutdown))
    edge.port = int(binds[0].rsplit(":", 1)[1])
    yield edge
    shutdown.set()


async def test_pipelined_requests_are_each_served(edge: Edge) -> None:
    """The counter sees what is served: two requests in one write are two answers (the baseline
    the smuggling test is measured against)."""
    answer = await edge.exchange(b"PUT /stream HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"
                                 b"GET /second HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert statuses(answer) == [200, 200]
    assert edge.served == ["/stream", "/second"]


@pytest.mark.parametrize("path", ["/stream", "/control"])
async def test_content_length_with_transfer_encoding_is_refused_and_the_hidden_request_never_served(
        edge: Edge, path: str) -> None:
    hidden = b"GET /hidden HTTP/1.1\r\nhost: x\r\n\r\n"
    body = b"0\r\n\r\n" + hidden
    answer = await edge.exchange(f"PUT {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n"
                                 f"transfer-encoding: chunked\r\n\r\n".encode() + body)
    assert statuses(answer) == [400]  # one answer, then the connection was closed
    assert b"\r\nconnection: close\r\n" in answer
    assert envelope(answer)["error"] == "BAD_FRAMING"
    assert edge.served == []  # neither the request nor the one hidden in its body


async def test_transfer_encoding_in_http10_is_refused(edge: Edge) -> None:
    answer = await edge.exchange(b"PUT /stream HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
                                 b"GET /hidden HTTP/1.0\r\n\r\n")
    assert statuses(answer) == [400] and envelope(answer)["error"] == "BAD_FRAMING"
    assert edge.served == []


@pytest.mark.parametrize("size_line", [b"zz", b"-1", b"%x" % 2**96, b"0x5", b""])
@pytest.mark.parametrize("path", ["/stream", "/control"])
async def test_broken_chunked_framing_is_a_4xx_without_a_traceback(
        edge: Edge, path: str, size_line: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """On the data plane and through the ASGI handoff alike, after a first good chunk."""
    caplog.set_level(logging.INFO)
    answer = await edge.exchange(f"PUT {path} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".encode()
                                 + b"3\r\nabc\r\n" + size_line + b"\r\nhello\r\n0\r\n\r\n"
                                 + b"GET /after HTTP/1.1\r\nhost: x\r\n\r\n")
    assert statuses(answer) == [400]
    assert envelope(answer)["error"] == "BAD_FRAMING"
    assert "/after" not in edge.served
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]


def head_of(size: int) -> bytes:
    """A GET whose header section is exactly `size` bytes (request line and final CRLF included)."""
    start, end = b"GET /control HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize("pieces", [1, 8])
async def test_the_header_section_limit_holds_however_the_head_arrives(edge: Edge, pieces: int) -> None:
    assert statuses(await edge.exchange(head_of(HEAD_LIMIT), pieces=pieces)) == [200]
    for size in (HEAD_LIMIT + 1, 64 * 1024):
        answer = await edge.exchange(head_of(size), pieces=pieces)
        assert statuses(answer) == [431], size
        assert envelope(answer)["error"] == "REQUEST_HEADER_FIELDS_TOO_LARGE"
    assert edge.served == ["/control"]


async def test_ten_thousand_headers_in_one_write_are_431(edge: Edge) -> None:
    head = b"GET /control HTTP/1.1\r\nhost: x\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(10_000)) + b"\r\n"
    answer = await edge.exchange(head)
    assert statuses(answer) == [431]
    assert edge.served == []


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"chunked, chunked", b"identity"])
async def test_an_unknown_transfer_coding_is_501_with_its_own_code(edge: Edge, coding: bytes) -> None:
    answer = await edge.exchange(b"PUT /stream HTTP/1.1\r\nhost: x\r\ntransfer-encoding: " + coding
                                 + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert statuses(answer) == [501]
    assert envelope(answer)["error"] == "UNSUPPORTED_TRANSFER_CODING"
    assert edge.served == []


async def test_the_http2_preface_is_refused_clearly(edge: Edge) -> None:
    answer = await edge.exchange(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")
    assert statuses(answer) == [505]
    assert envelope(answer)["error"] == "HTTP_VERSION_NOT_SUPPORTED"
    assert edge.served == []


async def test_a_head_that_is_not_http_is_a_400_in_the_envelope(edge: Edge) -> None:
    answer = await edge.exchange(b"GET /control HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n")
    assert statuses(answer) == [400]
    assert envelope(answer)["error"] == "BAD_REQUEST"
    assert edge.served == []
