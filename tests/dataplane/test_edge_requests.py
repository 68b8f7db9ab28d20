"""The HTTP edge of the whole gateway (the real control app behind the ASGI handoff, real agents behind
the data plane), spoken to in raw bytes: a request smuggled behind Content-Length + Transfer-Encoding is
never served (the account it would register does not exist), broken chunked framing is a 400 on a
control route and on an upload stream alike, with nothing half-written and no traceback logged, and
oversized heads, unknown codings and the HTTP/2 preface get their own clear refusal."""

from __future__ import annotations

import json
import logging
import re

import pytest
import trio

from tests.conftest import Gateway
from tests.dataplane.helpers import agent_files

STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


async def raw_exchange(gateway: Gateway, data: bytes, timeout: float = 15) -> bytes:
    """Send `data` in one write and read until the gateway closes the connection."""
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    received = bytearray()
    with trio.fail_after(timeout):
        await stream.send_all(data)
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    return bytes(received)


def answers(answer: bytes) -> list[tuple[int, str]]:
    """(status, error code) of every response in `answer` (all carry a JSON envelope or body)."""
    out = []
    for match in STATUS_LINE.finditer(answer):
        body = answer[answer.index(b"\r\n\r\n", match.end()) + 4:]
        decoded, _ = json.JSONDecoder().raw_decode(body.decode())
        out.append((int(match[1]), decoded.get("error", "") if isinstance(decoded, dict) else ""))
    return out


def register_request(email: str) -> bytes:
    body = json.dumps({"email": email, "password": "password123"}).encode()
    return (b"POST /api/auth/register HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


async def test_the_edge_refuses_what_h11_would_let_through(gateway: Gateway) -> None:
    hidden = register_request("hidden@example.com")
    body = b"0\r\n\r\n" + hidden  # an empty chunked body, or all of this by its Content-Length
    front = (b"POST /api/auth/register HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
             b"content-length: %d\r\ntransfer-encoding: chunked\r\n\r\n" % len(body))
    assert answers(await raw_exchange(gateway, front + body)) == [(400, "BAD_FRAMING")]  # one answer, closed
    assert (await gateway.register("hidden@example.com"))["user"]["email"] == "hidden@example.com"  # not taken

    head = b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad: " + b"p" * 64 * 1024 + b"\r\n\r\n"
    assert answers(await raw_exchange(gateway, head)) == [(431, "REQUEST_HEADER_FIELDS_TOO_LARGE")]
    many = b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(10_000)) + b"\r\n"
    assert answers(await raw_exchange(gateway, many)) == [(431, "REQUEST_HEADER_FIELDS_TOO_LARGE")]
    gzip = b"POST /api/auth/login HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n"
    assert answers(await raw_exchange(gateway, gzip)) == [(501, "UNSUPPORTED_TRANSFER_CODING")]
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert answers(await raw_exchange(gateway, preface)) == [(505, "HTTP_VERSION_NOT_SUPPORTED")]


@pytest.mark.parametrize("size_line", [b"zz", b"-1", b"%x" % 2**96])
async def test_broken_chunked_framing_is_400_on_control_and_stream_routes(
        gateway: Gateway, size_line: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "framing")
    token = session["accessToken"].encode()
    chunked = b"\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n" + size_line + b"\r\nxx\r\n0\r\n\r\n"
    control = b"POST /api/instances HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nauthorization: Bearer "
    upload = (b"PUT /api/servers/%d/files/upload?path=framed.bin HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
              % instance["id"])
    for head in (control, upload):
        answer = await raw_exchange(gateway, head + token + chunked)
        assert answers(answer) == [(400, "BAD_FRAMING")], answer[:300]
    await trio.sleep(0.3)  # the agent saw its upload cut off: nothing of it may stay behind
    assert sorted(path.name for path in agent_files(gateway, instance["vmid"]).rglob("*")) == []
    listing = await gateway.client.get("/api/servers", headers=gateway.bearer(session))
    assert len(listing.json()) == 1  # no second server from the half-read body
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
