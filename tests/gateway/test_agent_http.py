"""The agent client's HTTP for small calls (gateway/agent_http.py) against a real socket that answers
with exact bytes: every framing an agent may use is read whole, and anything short of a complete
answer is an error, never a truncated success."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from gateway.agent_http import SmallCallPool
from gateway.upstream import UpstreamBroken, UpstreamError

LENGTH = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"
CHUNKED = b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"ok\r\n7\r\n\":true}\r\n0\r\n\r\n"
UNTIL_CLOSE = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{\"ok\":true}"
SHORT = b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{\"ok\":"


async def _answer(answers: list[bytes], requests: list[bytes], stream: trio.SocketStream) -> None:
    """Answer each request on this connection with the next canned answer, then close."""
    async with stream:
        while answers:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            requests.append(data)
            answer = answers.pop(0)
            await stream.send_all(answer)
            if answer in (UNTIL_CLOSE, SHORT):
                return


async def _server(nursery: trio.Nursery, answers: list[bytes]) -> tuple[int, list[bytes]]:
    requests: list[bytes] = []
    listeners = await nursery.start(partial(trio.serve_tcp, partial(_answer, answers, requests), 0,
                                            host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], requests


async def test_length_and_chunked_answers_are_read_whole_on_one_kept_connection(nursery: trio.Nursery) -> None:
    port, requests = await _server(nursery, [LENGTH, CHUNKED])
    pool = SmallCallPool()
    headers = [(b"authorization", b"Bearer agent-secret")]
    assert await pool.call("127.0.0.1", port, "GET", "/ready", headers, None, limit=1024) == (200, b'{"ok":true}')
    assert await pool.call("127.0.0.1", port, "POST", "/stop", headers, b"{}", limit=1024) == (201, b'{"ok":true}')
    assert len(requests) == 2  # both on the first connection: the server only answers there
    assert requests[0].startswith(b"GET /ready HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"authorization: Bearer agent-secret\r\n" in requests[0]
    assert b"content-length: 2\r\n" in requests[1]
    await pool.aclose()


async def test_an_answer_delimited_by_close_is_complete_and_not_reused(nursery: trio.Nursery) -> None:
    port, _ = await _server(nursery, [UNTIL_CLOSE, LENGTH])
    pool = SmallCallPool()
    assert await pool.call("127.0.0.1", port, "GET", "/status", [], None, limit=1024) == (200, b'{"ok":true}')
    assert not pool._idle[("127.0.0.1", port)]


async def test_a_short_answer_is_an_error(nursery: trio.Nursery) -> None:
    port, _ = await _server(nursery, [SHORT])
    with pytest.raises(UpstreamBroken):
        await SmallCallPool().call("127.0.0.1", port, "GET", "/status", [], None, limit=1024)


async def test_an_answer_over_the_limit_is_refused(nursery: trio.Nursery) -> None:
    port, _ = await _server(nursery, [LENGTH])
    with pytest.raises(UpstreamError, match="larger than expected"):
        await SmallCallPool().call("127.0.0.1", port, "GET", "/status", [], None, limit=4)


async def test_garbage_is_an_error_and_a_closed_port_unreachable(nursery: trio.Nursery) -> None:
    port, _ = await _server(nursery, [b"SSH-2.0-OpenSSH_9.2\r\n\r\n"])
    with pytest.raises(UpstreamBroken, match="not an HTTP answer"):
        await SmallCallPool().call("127.0.0.1", port, "GET", "/ready", [], None, limit=1024)
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    free_port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(UpstreamError, match="cannot connect"):
        await SmallCallPool().call("127.0.0.1", free_port, "GET", "/ready", [], None, limit=1024)
