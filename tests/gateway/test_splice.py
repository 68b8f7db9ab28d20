"""Zero-copy bodies: gateway/fdio.py Splice on real TCP sockets (exact lengths, early ends, stalls,
backpressure, the copy fallback), and the relay choosing splice or copy end to end through the gateway
against a real reference agent (known-length bodies of ≥ 1 MiB spliced; small, chunked and Range-less
copy cases copied), checked by content and by the spliced-bytes counter on /metrics."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from gateway.fdio import SPLICE_PIPE_BYTES, Splice
from gateway.streams import SPLICE_MIN_BYTES
from tests.conftest import Gateway
from tests.dataplane.helpers import PeakRss, generated


class SourceFailed(Exception):
    def __init__(self, reason: str, stalled: bool) -> None:
        super().__init__(reason)
        self.stalled = stalled


async def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def _receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        assert chunk, f"stream ended after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


async def test_splice_moves_exactly_the_length_and_leaves_what_follows() -> None:
    writer, source = await _socket_pair()
    sink, reader = await _socket_pair()
    body, after = os.urandom(3 * SPLICE_PIPE_BYTES + 12345), b"next request"
    received = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.send_all, body + after)

        async def read() -> None:
            nonlocal received
            received = await _receive_exactly(reader, len(body))

        nursery.start_soon(read)
        await Splice(source, len(body), 5.0, SourceFailed).write_to(sink)
    assert received == body
    assert await _receive_exactly(source, len(after)) == after  # the bytes past the body stay unread
    for stream in (writer, source, sink, reader):
        await stream.aclose()


async def test_a_source_that_ends_early_raises_the_callers_error() -> None:
    writer, source = await _socket_pair()
    sink, reader = await _socket_pair()
    await writer.send_all(b"x" * 1000)
    await writer.aclose()
    with pytest.raises(SourceFailed, match="before the end of the body") as failed:
        await Splice(source, 5000, 5.0, SourceFailed).write_to(sink)
    assert failed.value.stalled is False
    assert await _receive_exactly(reader, 1000) == b"x" * 1000  # what came was passed on


async def test_a_stalled_source_times_out() -> None:
    writer, source = await _socket_pair()
    sink, _reader = await _socket_pair()
    await writer.send_all(b"x" * 10)
    with trio.fail_after(5), pytest.raises(SourceFailed, match="stalled") as failed:
        await Splice(source, 100, 0.3, SourceFailed).write_to(sink)
    assert failed.value.stalled is True


async def test_a_sink_that_stops_reading_stops_the_source() -> None:
    """Backpressure: with the reader asleep, the writer is held back after the socket buffers and one
    pipe's worth, and the Splice waits; nothing is read into the process."""
    writer, source = await _socket_pair()
    sink, reader = await _socket_pair()
    total = 256 * 1024 * 1024
    sent = 0

    async def write() -> None:
        nonlocal sent
        block = b"\0" * (1024 * 1024)
        while sent < total:
            await writer.send_all(block)
            sent += len(block)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        nursery.start_soon(Splice(source, total, 30.0, SourceFailed).write_to, sink)
        await trio.sleep(1.0)
        held_back = sent
        assert held_back < 64 * 1024 * 1024, held_back
        await trio.sleep(0.5)
        assert sent == held_back  # still held back: the writer does not advance while nobody reads
        received = await _receive_exactly(reader, 8 * 1024 * 1024)  # reading lets it move again
        assert received == b"\0" * len(received)
        nursery.cancel_scope.cancel()
    for stream in (writer, source, sink, reader):
        await stream.aclose()


async def test_streams_that_are_not_sockets_are_copied() -> None:
    left, right = trio.testing.memory_stream_pair()
    sink, reader = await _socket_pair()
    body = os.urandom(300_000)
    received = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(left.send_all, body)

        async def read() -> None:
            nonlocal received
            received = await _receive_exactly(reader, len(body))

        nursery.start_soon(read)
        await Splice(right, len(body), 5.0, SourceFailed).write_to(sink)
    assert received == body


# --- through the gateway ---------------------------------------------------------------------------


@pytest.fixture
async def server(gateway: Gateway) -> tuple[Gateway, dict, dict]:
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "splice")
    return gateway, session, instance


async def _spliced(gateway: Gateway) -> dict[str, float]:
    text = (await gateway.client.get("/metrics")).text
    return {direction: float(value) for direction, value in
            re.findall(r'^zlh_stream_spliced_bytes_total\{direction="(\w+)"\} (\S+)$', text, re.MULTILINE)}


async def _digest_of_download(gateway: Gateway, url: str, headers: dict[str, str], path: str) -> tuple[int, str]:
    digest, received = hashlib.sha256(), 0
    async with gateway.client.stream("GET", url, headers=headers, params={"path": path}) as down:
        assert down.status_code in (200, 206), await down.aread()
        async for chunk in down.aiter_raw():
            digest.update(chunk)
            received += len(chunk)
    return received, digest.hexdigest()


async def _digest_of(body: AsyncIterator[bytes]) -> str:
    digest = hashlib.sha256()
    async for chunk in body:
        digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("size, spliced", [(SPLICE_MIN_BYTES - 1, False), (24 * 1024 * 1024 + 7, True)])
async def test_known_length_bodies_splice_and_small_ones_copy_both_ways(
        server: tuple[Gateway, dict, dict], size: int, spliced: bool) -> None:
    gateway, session, instance = server
    auth = gateway.bearer(session)
    base = f"/api/servers/{instance['id']}/files"
    data = os.urandom(size)
    before = await _spliced(gateway)
    up = await gateway.client.put(f"{base}/upload", params={"path": "body.bin"}, content=data, headers=auth)
    assert up.status_code == 201, up.text
    assert up.json()["size"] == size
    assert (up.headers.get("connection") == "close") is spliced  # a spliced upload's connection is not reused
    received, digest = await _digest_of_download(gateway, f"{base}/download", auth, "body.bin")
    assert (received, digest) == (size, hashlib.sha256(data).hexdigest())
    after = await _spliced(gateway)
    moved = {d: after.get(d, 0.0) - before.get(d, 0.0) for d in ("upload", "download")}
    if spliced:
        assert moved["upload"] > size - 256 * 1024 and moved["download"] > size - 256 * 1024, moved
    else:
        assert moved == {"upload": 0.0, "download": 0.0}
    # The connection that carried the spliced upload was closed; the client's next request works.
    again = await gateway.client.get(f"/api/servers/{instance['id']}", headers=auth)
    assert again.status_code == 200


async def test_chunked_uploads_and_range_answers_take_the_right_path(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    auth = gateway.bearer(session)
    base = f"/api/servers/{instance['id']}/files"
    size = 8 * 1024 * 1024
    before = await _spliced(gateway)
    up = await gateway.client.put(f"{base}/upload", params={"path": "chunked.bin"}, content=generated(size),
                                  headers=auth)
    assert up.status_code == 201, up.text
    assert (await _spliced(gateway)).get("upload", 0.0) == before.get("upload", 0.0)  # no length: copied
    # A Range answer has its own Content-Length and is passed through untouched: spliced.
    start = 3 * 1024 * 1024 + 5
    received, digest = await _digest_of_download(gateway, f"{base}/download", {**auth, "range": f"bytes={start}-"},
                                                 "chunked.bin")
    expected = hashlib.sha256()
    seen = 0
    async for chunk in generated(size):
        expected.update(chunk[max(0, start - seen):])
        seen += len(chunk)
    assert (received, digest) == (size - start, expected.hexdigest())
    assert (await _spliced(gateway)).get("download", 0.0) > before.get("download", 0.0)


async def test_spliced_gigabyte_keeps_memory_flat(server: tuple[Gateway, dict, dict], nursery: trio.Nursery) -> None:
    gateway, session, instance = server
    auth = gateway.bearer(session)
    base = f"/api/servers/{instance['id']}/files"
    size = 1024 * 1024 * 1024
    meter = PeakRss()
    await nursery.start(meter.run)
    up = await gateway.client.put(f"{base}/upload", params={"path": "gig.bin"}, content=generated(size),
                                  headers={**auth, "content-length": str(size)})
    assert up.status_code == 201, up.text
    received, digest = await _digest_of_download(gateway, f"{base}/download", auth, "gig.bin")
    assert (received, digest) == (size, await _digest_of(generated(size)))
    assert meter.growth < 64 * 1024 * 1024, meter.growth
    assert (await _spliced(gateway)).get("download", 0.0) >= size - 256 * 1024
