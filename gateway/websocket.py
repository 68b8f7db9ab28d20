"""A lean websocket endpoint over a trio stream, for the console relay (RFC 6455, no extensions).

No background task and no message queue per connection: whoever awaits `get_message` is the reader
(and pulls bytes off the socket only then, so a slow consumer slows the producer through TCP).
Writes from several tasks are serialized by a lock. Pings are answered as they are read.

Why not a library endpoint: the console's cost per line is what the relay adds to a round trip, and
measurement put most of it in the endpoint, not the network.
- wsproto parses every frame through layers of generators and re-encodes every message; a relay needs
  neither, because a frame the agent sent (unmasked) is already a valid frame for the browser, and a
  browser's frame (masked) is a valid frame for the agent. `forward_messages` and
  `next_message_raw` hand out the raw bytes of whole messages so the relay can pass them on as they
  came, after looking at them.
- trio's SocketStream adds a scheduler pass after every successful call, and a lock another: the
  endpoint uses the socket's descriptor directly (gateway/fdio.py) and takes its write lock without
  a checkpoint when no other task holds it.
Handshakes are parsed by h11 and the accept key computed by wsproto. No extension is ever
negotiated, so a frame with a reserved bit set is a protocol error (1002). A close frame is checked
as RFC 6455 §5.5.1 and §7.4 say: a 1-byte payload or a code no endpoint may send is a protocol error
(1002), a reason that is not UTF-8 is bad data (1007); so no invalid close is ever relayed on."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import h11
import trio
from wsproto.utilities import generate_accept_token

from . import fdio

RECEIVE_SIZE = 64 * 1024
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)
CLOSE_PROTOCOL, CLOSE_NO_STATUS, CLOSE_LOST, CLOSE_BAD_DATA, CLOSE_TOO_BIG = 1002, 1005, 1006, 1007, 1009


@dataclass(frozen=True)
class CloseReason:
    code: int
    reason: str | None = None


class ConnectionClosed(Exception):
    def __init__(self, reason: CloseReason) -> None:
        super().__init__(f"websocket closed: {reason.code} {reason.reason or ''}")
        self.reason = reason


class HandshakeFailed(Exception):
    pass


class _Violation(Exception):
    """The peer broke the protocol: close with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


# --- framing --------------------------------------------------------------------------------------


def _xor(data: bytes, key: bytes) -> bytes:
    """Mask or unmask `data` with the 4-byte `key` (one big-integer XOR, not a Python loop)."""
    size = len(data)
    if not size:
        return b""
    stream = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(size, "little")


def encode_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final frame; a client masks (RFC 6455 §5.3), a server never does."""
    size = len(payload)
    mask_bit = 0x80 if mask else 0
    if size < 126:
        head = bytes((0x80 | opcode, mask_bit | size))
    elif size < 1 << 16:
        head = bytes((0x80 | opcode, mask_bit | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, mask_bit | 127)) + size.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _xor(payload, key)


def close_payload(code: int, reason: str | None) -> bytes:
    """A close frame's payload; the reason is cut to fit 125 bytes on a character boundary."""
    return code.to_bytes(2, "big") + (reason or "").encode()[:123].decode(errors="ignore").encode()


def close_code_allowed(code: int) -> bool:
    """Whether a peer may send `code` (RFC 6455 §7.4): the defined codes 1000-1003 and 1007-1014,
    and 3000-4999 (registered and private); never 1004 (reserved), 1005, 1006 or 1015 (local-only)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def parse_close(payload: bytes) -> CloseReason:
    """A received close frame's code and reason, or a _Violation saying how it breaks the protocol."""
    if not payload:
        return CloseReason(CLOSE_NO_STATUS)
    if len(payload) == 1:
        raise _Violation(CLOSE_PROTOCOL, "a close payload of one byte")
    code = int.from_bytes(payload[:2], "big")
    if not close_code_allowed(code):
        raise _Violation(CLOSE_PROTOCOL, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise _Violation(CLOSE_BAD_DATA, "close reason is not UTF-8") from None
    return CloseReason(code, reason or None)


@dataclass(slots=True)
class _Frame:
    opcode: int
    fin: bool
    payload: bytes  # unmasked
    end: int  # where the frame ends in the buffer


def _next_frame(buffer: bytearray, start: int, *, masked: bool, limit: int) -> _Frame | None:
    """The frame at `start` if the buffer holds all of it; None if more bytes are needed."""
    available = len(buffer) - start
    if available < 2:
        return None
    first, second = buffer[start], buffer[start + 1]
    if first & 0x70:
        raise _Violation(CLOSE_PROTOCOL, "reserved bits set (no extension was negotiated)")
    opcode, fin = first & 0x0F, bool(first & 0x80)
    if opcode not in DATA_OPCODES and opcode not in CONTROL_OPCODES:
        raise _Violation(CLOSE_PROTOCOL, f"unknown opcode {opcode}")
    if bool(second & 0x80) != masked:
        raise _Violation(CLOSE_PROTOCOL, "client frames must be masked, server frames must not")
    size, at = second & 0x7F, start + 2
    if size >= 126:
        width = 2 if size == 126 else 8
        if available < 2 + width:
            return None
        size, at = int.from_bytes(buffer[at:at + width], "big"), at + width
    if opcode in CONTROL_OPCODES and (size > 125 or not fin):
        raise _Violation(CLOSE_PROTOCOL, "control frames are short and never fragmented")
    if size > limit:
        raise _Violation(CLOSE_TOO_BIG, "message too big")
    key = bytes(buffer[at:at + 4]) if masked else b""
    at += len(key)
    if len(buffer) < at + size:
        return None
    payload = bytes(buffer[at:at + size])
    return _Frame(opcode, fin, _xor(payload, key) if masked else payload, at + size)


# --- the endpoint ---------------------------------------------------------------------------------


class WebSocket:
    def __init__(self, stream: trio.SocketStream, *, client_side: bool, max_message: int,
                 subprotocol: str | None = None, received: bytes = b"") -> None:
        self.stream = stream
        self._client_side = client_side  # a client masks what it sends; a server receives masked frames
        self._max = max_message
        self._send_lock = trio.Lock()
        self._buffer = bytearray(received)
        self._start = 0  # where the current message's first frame begins in the buffer
        self._at = 0  # where the next unparsed frame begins
        self._message: list[bytes] = []
        self._message_opcode = 0
        self._message_size = 0
        self._interleaved = False  # a control frame arrived between this message's fragments
        self._peeked: tuple[int, _Frame] | None = None
        self.closed: CloseReason | None = None
        self.subprotocol = subprotocol

    # --- writing ---

    async def _send_bytes(self, data: bytes) -> None:
        try:
            self._send_lock.acquire_nowait()  # uncontended: no scheduler pass
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            await fdio.send_all(self.stream, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.closed = self.closed or CloseReason(CLOSE_LOST, "connection lost")
            raise ConnectionClosed(self.closed) from exc
        finally:
            self._send_lock.release()

    async def _send_frame(self, opcode: int, payload: bytes) -> None:
        await self._send_bytes(encode_frame(opcode, payload, mask=self._client_side))

    async def send_message(self, message: str | bytes) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        if isinstance(message, str):
            await self._send_frame(OP_TEXT, message.encode())
        else:
            await self._send_frame(OP_BINARY, message)

    async def send_raw(self, frames: bytes) -> None:
        """Whole frames as another endpoint received them, valid in this direction (see the module doc)."""
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        await self._send_bytes(frames)

    async def ping(self, payload: bytes = b"") -> None:
        if self.closed is None:
            await self._send_frame(OP_PING, payload)

    # --- reading ---

    async def _fill(self) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        try:
            data = await fdio.receive_some(self.stream, RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            self.closed = self.closed or CloseReason(CLOSE_LOST, "connection lost")
            raise ConnectionClosed(self.closed)
        if self._start:  # drop what was handed out already
            del self._buffer[:self._start]
            self._at -= self._start
            self._start = 0
        self._buffer += data

    async def next_message_raw(self) -> tuple[str | bytes, bytes]:
        """The next data message, and the raw frames it came in (masked as they arrived); pings are
        answered on the way; a close frame, a broken protocol or a message over the limit raises
        ConnectionClosed (after closing with 1002, 1007 or 1009 as the case may be)."""
        while True:
            try:
                frame = self._parse()
                message = None if frame is None else await self._take(frame)
            except _Violation as violation:
                await self.aclose(violation.code, violation.reason)
                raise ConnectionClosed(CloseReason(violation.code, violation.reason)) from None
            if message is not None:
                return message
            if frame is None:
                await self._fill()

    def _parse(self) -> _Frame | None:
        peeked, self._peeked = self._peeked, None
        if peeked is not None and peeked[0] == self._at:
            return peeked[1]
        return _next_frame(self._buffer, self._at, masked=not self._client_side,
                           limit=self._max - self._message_size)

    async def _take(self, frame: _Frame) -> tuple[str | bytes, bytes] | None:
        """Account for one frame; a whole data message once its last frame is in."""
        begins, self._at = self._at, frame.end
        if frame.opcode in CONTROL_OPCODES:
            if self._message:
                self._interleaved = True  # the raw span now holds a control frame: re-encode instead
            else:
                self._start = self._at
            await self._control(frame)
            return None
        if (frame.opcode == OP_CONTINUATION) != bool(self._message):
            raise _Violation(CLOSE_PROTOCOL, "unexpected continuation or unfinished message")
        if not self._message:
            self._message_opcode, self._start = frame.opcode, begins
        self._message.append(frame.payload)
        self._message_size += len(frame.payload)
        if not frame.fin:
            return None
        payload = self._message[0] if len(self._message) == 1 else b"".join(self._message)
        if self._interleaved:
            raw = encode_frame(self._message_opcode, payload, mask=not self._client_side)
        else:
            raw = bytes(self._buffer[self._start:self._at])
        self._start = self._at
        self._message, self._message_size, self._interleaved = [], 0, False
        if self._message_opcode == OP_BINARY:
            return payload, raw
        try:
            return payload.decode(), raw
        except UnicodeDecodeError:
            raise _Violation(CLOSE_BAD_DATA, "text message is not UTF-8") from None

    async def _control(self, frame: _Frame) -> None:
        if frame.opcode == OP_PING:
            if self.closed is None:
                await self._send_frame(OP_PONG, frame.payload)
        elif frame.opcode == OP_CLOSE:
            received = parse_close(frame.payload)
            code, reason = received.code, received.reason
            if self.closed is None:
                self.closed = CloseReason(code, reason)
                try:  # answer the close (RFC 6455 §5.5.1)
                    await self._send_frame(OP_CLOSE, close_payload(code, None) if code != CLOSE_NO_STATUS else b"")
                except ConnectionClosed:
                    pass
            raise ConnectionClosed(CloseReason(code, reason))

    async def get_message(self) -> str | bytes:
        return (await self.next_message_raw())[0]

    async def forward_messages(self) -> bytes:
        """The raw frames of the next data message and of every further one already received whole,
        for a relay to pass on in one write."""
        _, raw = await self.next_message_raw()
        parts = [raw]
        while self._whole_message_buffered():
            parts.append((await self.next_message_raw())[1])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _whole_message_buffered(self) -> bool:
        """Whether the next frame is a whole data message already received (taking it never waits)."""
        if self._message:
            return False
        try:
            frame = _next_frame(self._buffer, self._at, masked=not self._client_side, limit=self._max)
        except _Violation:
            return False  # the next read reports it
        if frame is None or not frame.fin or frame.opcode not in (OP_TEXT, OP_BINARY):
            return False
        self._peeked = (self._at, frame)
        return True

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame (once) and close the socket; the peer's answer is not awaited."""
        if self.closed is None:
            self.closed = CloseReason(code, reason)
            try:
                await self._send_frame(OP_CLOSE, close_payload(code, reason))
            except ConnectionClosed:
                pass
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


# --- handshakes -----------------------------------------------------------------------------------


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str:
    return ", ".join(value.decode("latin-1") for key, value in headers if key == name)


def _tokens(value: str) -> list[str]:
    return [token.strip() for token in value.split(",") if token.strip()]


async def accept(stream: trio.SocketStream, raw: bytes, pick: Callable[[Iterable[str]], str | None], *,
                 max_message: int) -> WebSocket:
    """Server side: `raw` holds the client's upgrade request exactly as it arrived (and anything after)."""
    parser = h11.Connection(h11.SERVER)
    if raw:  # (h11 reads empty bytes as the end of the stream)
        parser.receive_data(raw)
    while True:
        event = parser.next_event()
        if event is not h11.NEED_DATA:
            break
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise HandshakeFailed("client left during the handshake")
        parser.receive_data(data)
    if not isinstance(event, h11.Request):
        raise HandshakeFailed(type(event).__name__)
    headers = list(event.headers)
    key = _header(headers, b"sec-websocket-key")
    if (event.method != b"GET" or "websocket" not in _header(headers, b"upgrade").lower()
            or "upgrade" not in _header(headers, b"connection").lower()
            or _header(headers, b"sec-websocket-version") != "13" or not key):
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        raise HandshakeFailed("not a websocket upgrade")
    subprotocol = pick(_tokens(_header(headers, b"sec-websocket-protocol")))
    answer = ("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
              f"sec-websocket-accept: {generate_accept_token(key.encode()).decode()}\r\n")
    if subprotocol:
        answer += f"sec-websocket-protocol: {subprotocol}\r\n"
    await stream.send_all((answer + "\r\n").encode("latin-1"))
    received, _ = parser.trailing_data
    return WebSocket(stream, client_side=False, max_message=max_message, subprotocol=subprotocol,
                     received=bytes(received))


async def connect(stream: trio.SocketStream, host: str, resource: str, headers: list[tuple[bytes, bytes]], *,
                  max_message: int) -> WebSocket:
    """Client side over an open stream (the caller bounds the time)."""
    key = base64.b64encode(os.urandom(16))
    parser = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=resource, headers=[
        (b"host", host.encode()), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
        (b"sec-websocket-key", key), (b"sec-websocket-version", b"13"), *headers])
    await stream.send_all((parser.send(request) or b"") + (parser.send(h11.EndOfMessage()) or b""))
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise HandshakeFailed(f"upstream answered with something that is not HTTP: {exc}") from exc
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise HandshakeFailed("upstream closed during the handshake")
            parser.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            break
        if isinstance(event, (h11.Response, h11.InformationalResponse)):
            if isinstance(event, h11.Response):
                raise HandshakeFailed(f"upstream refused the websocket ({event.status_code})")
            continue
        raise HandshakeFailed(f"unexpected {type(event).__name__} during the handshake")
    answer = list(event.headers)
    if _header(answer, b"sec-websocket-accept") != generate_accept_token(key).decode():
        raise HandshakeFailed("upstream answered with the wrong accept key")
    received, _ = parser.trailing_data
    return WebSocket(stream, client_side=True, max_message=max_message,
                     subprotocol=_header(answer, b"sec-websocket-protocol") or None, received=bytes(received))
