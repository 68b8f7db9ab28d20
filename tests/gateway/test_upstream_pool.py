"""The upstream pool keeps connections alive between requests, also in a process holding more than
1,024 descriptors (as a gateway polling thousands of agents does): select() cannot look at those,
and treating them as closed made every poll open a fresh connection."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from functools import partial

import h11
import pytest
import trio

from gateway.upstream import UpstreamPool


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip("the hard descriptor limit is below 2,048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in spare:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _serve_keep_alive(stream: trio.SocketStream, accepted: list[int]) -> None:
    accepted.append(stream.socket.fileno())
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return
            conn.receive_data(data)
        elif isinstance(event, h11.EndOfMessage):
            body = b'{"ok": true}'
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                ("content-length", str(len(body)))])) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            conn.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed):
            return


async def test_an_idle_connection_is_reused_past_1024_descriptors(many_descriptors: None,
                                                                  nursery: trio.Nursery) -> None:
    accepted: list[int] = []
    listeners = await nursery.start(partial(trio.serve_tcp, lambda s: _serve_keep_alive(s, accepted), 0,
                                                  host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    pool = UpstreamPool()
    for _ in range(3):
        async with pool.request("127.0.0.1", port, "GET", "/ready", []) as response:
            assert response.status == 200
            assert await response.read_all() == b'{"ok": true}'
            assert response._connection.stream.socket.fileno() > 1024
        await trio.sleep(0.05)
    assert len(accepted) == 1
    await pool.aclose()
