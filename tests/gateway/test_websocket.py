"""The console's websocket endpoint (gateway/websocket.py) on real sockets, spoken to in raw RFC 6455
frames: the handshake, reassembly, pings, the raw frames a relay passes on, and every way a peer can
break the protocol (each closes with its own code)."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from wsproto.utilities import generate_accept_token

from gateway.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ConnectionClosed,
    HandshakeFailed,
    WebSocket,
    accept,
    close_payload,
    connect,
    encode_frame,
)

LIMIT = 1024


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    encoded = bytearray(encode_frame(opcode, payload, mask=mask))
    if not fin:
        encoded[0] &= 0x7F
    encoded[0] |= rsv
    return bytes(encoded)


async def read_frame(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bytes]:
    """One unmasked frame from the server side (small payloads only)."""
    while len(buffer) < 2 or len(buffer) < 2 + (buffer[1] & 0x7F):
        buffer += await stream.receive_some(65536)
    size = buffer[1] & 0x7F
    opcode, payload = buffer[0] & 0x0F, bytes(buffer[2:2 + size])
    del buffer[:2 + size]
    return opcode, payload


@asynccontextmanager
async def server_endpoint(nursery: trio.Nursery) -> AsyncIterator[tuple[trio.SocketStream, trio.MemoryReceiveChannel]]:
    """A raw client socket, and a channel giving the server-side WebSocket it was accepted as."""
    send, receive = trio.open_memory_channel[WebSocket](1)

    async def serve(stream: trio.SocketStream) -> None:
        websocket = await accept(stream, b"", lambda offered: "zlh-console.v1" if "zlh-console.v1" in offered
                                 else None, max_message=LIMIT)
        await send.send(websocket)
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    client = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
    key = base64.b64encode(os.urandom(16))
    await client.send_all(b"GET /console HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                          b"sec-websocket-version: 13\r\nsec-websocket-protocol: other, zlh-console.v1\r\n"
                          b"sec-websocket-key: " + key + b"\r\n\r\n"
                          + frame(OP_TEXT, b"sent with the handshake"))
    head = b""
    while b"\r\n\r\n" not in head:
        head += await client.receive_some(1)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"sec-websocket-accept: " + generate_accept_token(key) + b"\r\n" in head
    assert b"sec-websocket-protocol: zlh-console.v1\r\n" in head
    yield client, receive


async def test_messages_are_reassembled_and_pings_answered(nursery: trio.Nursery) -> None:
    async with server_endpoint(nursery) as (client, accepted):
        websocket = await accepted.receive()
        assert websocket.subprotocol == "zlh-console.v1"
        assert await websocket.get_message() == "sent with the handshake"  # bytes after the head are kept
        await client.send_all(frame(OP_TEXT, b"hel", fin=False) + frame(OP_PING, b"are you there")
                              + frame(OP_CONTINUATION, "lo ✓".encode()) + frame(OP_BINARY, b"\x00\x01"))
        assert await websocket.get_message() == "hello ✓"
        assert await websocket.get_message() == b"\x00\x01"
        buffer = bytearray()
        assert await read_frame(client, buffer) == (OP_PONG, b"are you there")
        await websocket.send_message("to the client")
        assert await read_frame(client, buffer) == (OP_TEXT, b"to the client")


async def test_raw_frames_are_the_bytes_that_arrived(nursery: trio.Nursery) -> None:
    async with server_endpoint(nursery) as (client, accepted):
        websocket = await accepted.receive()
        await websocket.get_message()
        first, second = frame(OP_TEXT, b'{"type":"command"}'), frame(OP_TEXT, b"two")
        a, b = frame(OP_TEXT, b"a"), frame(OP_TEXT, b"b")
        await client.send_all(first + second + a + b + frame(OP_TEXT, b"c", fin=False))
        await trio.sleep(0.1)  # all of it in the server's socket buffer: one read takes it
        assert await websocket.next_message_raw() == ('{"type":"command"}', first)
        # Whole messages already received leave together; the unfinished one waits for its end.
        assert await websocket.forward_messages() == second + a + b
        await client.send_all(frame(OP_PING, b"") + frame(OP_CONTINUATION, b"d"))
        message, raw = await websocket.next_message_raw()
        assert message == "cd"  # a ping between fragments: the message is re-encoded without it
        assert raw[0] == 0x80 | OP_TEXT and raw[1] & 0x80


@pytest.mark.parametrize(("bad", "code"), [
    (frame(OP_TEXT, b"unmasked", mask=False), 1002),
    (frame(OP_TEXT, b"compressed?", rsv=0x40), 1002),
    (frame(0x3, b"reserved opcode"), 1002),
    (frame(OP_CONTINUATION, b"nothing to continue"), 1002),
    (frame(OP_PING, b"x" * 126), 1002),
    (frame(OP_TEXT, b"\xff\xfe"), 1007),
    (frame(OP_TEXT, b"x" * (LIMIT + 1)), 1009),
    (frame(OP_TEXT, b"x" * 600, fin=False) + frame(OP_CONTINUATION, b"x" * 600), 1009),
])
async def test_a_broken_protocol_closes_with_its_code(nursery: trio.Nursery, bad: bytes, code: int) -> None:
    async with server_endpoint(nursery) as (client, accepted):
        websocket = await accepted.receive()
        await websocket.get_message()
        await client.send_all(bad)
        with pytest.raises(ConnectionClosed) as closed:
            await websocket.get_message()
        assert closed.value.reason.code == code
        opcode, payload = await read_frame(client, bytearray())
        assert (opcode, int.from_bytes(payload[:2], "big")) == (OP_CLOSE, code)


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return frame(OP_CLOSE, code.to_bytes(2, "big") + reason)


@pytest.mark.parametrize(("bad", "code"), [
    (frame(OP_CLOSE, b"\x03"), 1002),  # a 1-byte payload: half a code
    *[(close_frame(invalid), 1002) for invalid in (0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535)],
    (close_frame(1000, b"\xff\xfe"), 1007),
    (close_frame(4000, "✓".encode()[:2]), 1007),  # a reason cut inside a character
])
async def test_an_invalid_close_frame_closes_with_its_code(nursery: trio.Nursery, bad: bytes, code: int) -> None:
    async with server_endpoint(nursery) as (client, accepted):
        websocket = await accepted.receive()
        await websocket.get_message()
        await client.send_all(bad)
        with pytest.raises(ConnectionClosed) as closed:
            await websocket.get_message()
        assert closed.value.reason.code == code
        opcode, payload = await read_frame(client, bytearray())
        assert (opcode, int.from_bytes(payload[:2], "big")) == (OP_CLOSE, code)
        assert await client.receive_some(1) == b""  # and the connection is closed


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999])
async def test_a_valid_close_code_is_echoed(nursery: trio.Nursery, code: int) -> None:
    async with server_endpoint(nursery) as (client, accepted):
        websocket = await accepted.receive()
        await websocket.get_message()
        await client.send_all(close_frame(code, "fin ✓".encode()))
        with pytest.raises(ConnectionClosed) as closed:
            await websocket.get_message()
        assert (closed.value.reason.code, closed.value.reason.reason) == (code, "fin ✓")
        assert await read_frame(client, bytearray()) == (OP_CLOSE, code.to_bytes(2, "big"))


async def test_an_empty_close_is_answered_empty_and_a_long_reason_cut_on_a_character(nursery: trio.Nursery) -> None:
    assert close_payload(1000, "✓" * 60) == (1000).to_bytes(2, "big") + "✓".encode() * 41  # 123 bytes max
    async with server_endpoint(nursery) as (client, accepted):
        websocket = await accepted.receive()
        await websocket.get_message()
        await client.send_all(frame(OP_CLOSE, b""))
        with pytest.raises(ConnectionClosed) as closed:
            await websocket.get_message()
        assert closed.value.reason.code == 1005
        assert await read_frame(client, bytearray()) == (OP_CLOSE, b"")


async def test_a_close_frame_is_answered_and_reported(nursery: trio.Nursery) -> None:
    async with server_endpoint(nursery) as (client, accepted):
        websocket = await accepted.receive()
        await websocket.get_message()
        await client.send_all(frame(OP_CLOSE, (4010).to_bytes(2, "big") + b"bye"))
        with pytest.raises(ConnectionClosed) as closed:
            await websocket.get_message()
        assert (closed.value.reason.code, closed.value.reason.reason) == (4010, "bye")
        assert await read_frame(client, bytearray()) == (OP_CLOSE, (4010).to_bytes(2, "big"))
        with pytest.raises(ConnectionClosed):
            await websocket.send_message("too late")


async def test_the_client_side_masks_and_checks_the_accept_key(nursery: trio.Nursery) -> None:
    async def agent(wrong_key: bool, stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        key = next(line.split(b": ", 1)[1] for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        token = b"wrong" if wrong_key else generate_accept_token(key)
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                              b"sec-websocket-accept: " + token + b"\r\n\r\n" + frame(OP_TEXT, b"hi", mask=False))
        buffer = bytearray(await stream.receive_some(65536))
        assert buffer[1] & 0x80  # masked, as a client must
        await stream.send_all(b"ok")

    for wrong_key in (False, True):
        listeners = await nursery.start(partial(trio.serve_tcp, partial(agent, wrong_key), 0, host="127.0.0.1"))
        stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        if wrong_key:
            with pytest.raises(HandshakeFailed, match="accept key"):
                await connect(stream, "agent", "/console", [], max_message=LIMIT)
            continue
        websocket = await connect(stream, "agent", "/console", [(b"authorization", b"Bearer s")], max_message=LIMIT)
        assert await websocket.get_message() == "hi"  # sent right behind the 101
        await websocket.send_message("command")
