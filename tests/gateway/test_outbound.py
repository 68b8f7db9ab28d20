"""What the gateway sends to an agent is built from checked parts (gateway/outbound.py): segments are
percent-encoded whole, file paths capped, and both clients — the small-call pool and the stream pool —
refuse, before connecting, a target or header that would not be one well-formed request. A listener
counts the connections it was offered, so "nothing was sent" is observed."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from gateway.agent_client import AgentClient, AgentTarget
from gateway.agent_http import SmallCallPool
from gateway.outbound import (
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    OutboundRefused,
    check_file_path,
    segment,
)
from gateway.upstream import UpstreamPool

UNSAFE_TARGETS = ["/mods/x\r\nGET /evil HTTP/1.1", "/mods/a b", "/mods/nul\x00", "/mods/del\x7f", "/mods/é", ""]
UNSAFE_HEADERS = [[(b"x-id", b"a\r\nx-injected: 1")], [(b"x-id", b"a\nb")], [(b"x-id", b"nul\x00")],
                  [(b"bad name", b"v")], [(b"x-id\r\nx-injected", b"v")]]


async def _counting_listener(nursery: trio.Nursery) -> tuple[int, list[bytes]]:
    """A loopback port that records what each connection sent (and answers nothing useful)."""
    received: list[bytes] = []

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            data = await stream.receive_some(65536)
            received.append(data)
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], received


def test_a_segment_is_encoded_whole_and_capped() -> None:
    assert segment("x\r\nGET /evil HTTP/1.1") == "x%0D%0AGET%20%2Fevil%20HTTP%2F1.1"
    assert segment("a?b#c%d\x00") == "a%3Fb%23c%25d%00"
    assert segment("mod-1.2_x~") == "mod-1.2_x~"
    assert segment("é" * (MAX_NAME_BYTES // 2)) == "%C3%A9" * (MAX_NAME_BYTES // 2)
    for refused, code in [("", "INVALID_PATH_SEGMENT"), (".", "INVALID_PATH_SEGMENT"), ("..", "INVALID_PATH_SEGMENT"),
                          ("n" * (MAX_NAME_BYTES + 1), "NAME_TOO_LONG"), ("\ud800", "INVALID_PATH")]:
        with pytest.raises(OutboundRefused) as caught:
            segment(refused)
        assert (caught.value.status, caught.value.code) == (400, code)


def test_a_file_path_is_capped_in_bytes_per_name_and_whole() -> None:
    fits = "/".join(["n" * MAX_NAME_BYTES] * 16)[:MAX_PATH_BYTES]
    assert check_file_path(fits) == fits
    for refused, code in [("a/" * 2100, "PATH_TOO_LONG"), ("n" * 5000, "NAME_TOO_LONG"),
                          ("ok/" + "é" * 128, "NAME_TOO_LONG"), ("a\x00b", "INVALID_PATH"), ("\udcff", "INVALID_PATH")]:
        with pytest.raises(OutboundRefused) as caught:
            check_file_path(refused)
        assert (caught.value.status, caught.value.code) == (400, code)


async def test_the_small_call_client_refuses_an_unsafe_request_before_connecting(nursery: trio.Nursery) -> None:
    port, received = await _counting_listener(nursery)
    pool = SmallCallPool()
    for target in UNSAFE_TARGETS:
        with pytest.raises(OutboundRefused) as caught:
            await pool.call("127.0.0.1", port, "DELETE", target, [], None, limit=1024)
        assert caught.value.code == "INVALID_REQUEST_TARGET"
    for headers in UNSAFE_HEADERS:
        with pytest.raises(OutboundRefused) as caught:
            await pool.call("127.0.0.1", port, "GET", "/status", headers, None, limit=1024)
        assert caught.value.code == "INVALID_HEADER"
    assert received == []
    # The agent client lets the refusal through as the 400 it is (it is not agent trouble).
    client = AgentClient(pool)
    with pytest.raises(OutboundRefused):
        await client.call(AgentTarget("127.0.0.1", port, "secret"), "DELETE", UNSAFE_TARGETS[0])
    assert received == []
    assert (await client.call(AgentTarget("127.0.0.1", port, "secret"), "GET", "/status?x=%0D%0A")).status == 200
    assert received[0].startswith(b"GET /status?x=%0D%0A HTTP/1.1\r\n")
    await pool.aclose()


async def test_the_stream_client_refuses_an_unsafe_request_before_connecting(nursery: trio.Nursery) -> None:
    port, received = await _counting_listener(nursery)
    pool = UpstreamPool()
    cases = [(target, [], "INVALID_REQUEST_TARGET") for target in UNSAFE_TARGETS]
    cases += [("/files/download", headers, "INVALID_HEADER") for headers in UNSAFE_HEADERS]
    for target, headers, code in cases:
        with pytest.raises(OutboundRefused) as caught:
            async with pool.request("127.0.0.1", port, "GET", target, headers):
                raise AssertionError("sent")
        assert caught.value.code == code
    assert received == []
    async with pool.request("127.0.0.1", port, "GET", "/files/download?path=a%20b", [(b"x-tab", b"a\tb")]) as answer:
        assert answer.status == 200 and await answer.read_all() == b"{}"
    assert len(received) == 1
    await pool.aclose()
