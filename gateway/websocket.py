"""A lean websocket endpoint over a trio stream, driven by wsproto, for the console relay.

No background task and no message queue per connection: whoever awaits `get_message` is the reader
(and pulls bytes off the socket only then, so a slow consumer slows the producer through TCP).
Writes from several tasks are serialized by a lock. Pings are answered as they are read. Compared
with trio-websocket this saves two task switches per message each way and most of the memory of an
idle connection, which is what a relay holding thousands of consoles pays for."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

RECEIVE_SIZE = 64 * 1024


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


class WebSocket:
    def __init__(self, stream: trio.abc.Stream, ws: WSConnection, *, max_message: int,
                 subprotocol: str | None = None) -> None:
        self.stream = stream
        self._ws = ws
        self._max = max_message
        self._send_lock = trio.Lock()
        self._parts: list[str | bytes] = []
        self._size = 0
        self.closed: CloseReason | None = None
        self.subprotocol = subprotocol

    async def _send(self, event: object) -> None:
        data = self._ws.send(event)  # type: ignore[arg-type]
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.closed = self.closed or CloseReason(1006, "connection lost")
                raise ConnectionClosed(self.closed) from exc

    async def send_message(self, message: str | bytes) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        await self._send(Message(data=message))

    async def ping(self, payload: bytes = b"") -> None:
        if self.closed is None:
            await self._send(Ping(payload=payload))

    async def get_message(self) -> str | bytes:
        while True:
            for event in self._ws.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    self._size += len(event.data)
                    if self._size > self._max:
                        await self.aclose(1009, "message too big")
                        raise ConnectionClosed(CloseReason(1009, "message too big"))
                    self._parts.append(event.data)
                    if event.message_finished:
                        parts, self._parts, self._size = self._parts, [], 0
                        return parts[0] if len(parts) == 1 else type(parts[0])().join(parts)  # type: ignore[arg-type]
                elif isinstance(event, Ping):
                    await self._send(event.response())
                elif isinstance(event, CloseConnection):
                    self.closed = CloseReason(event.code, event.reason)
                    if self._ws.state is ConnectionState.REMOTE_CLOSING:
                        try:
                            await self._send(event.response())
                        except ConnectionClosed:
                            pass
                    raise ConnectionClosed(self.closed)
            if self.closed is not None:
                raise ConnectionClosed(self.closed)
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.closed = self.closed or CloseReason(1006, "connection lost")
                raise ConnectionClosed(self.closed)
            self._ws.receive_data(data)

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame (once) and close the socket; the peer's answer is not awaited."""
        if self.closed is None and self._ws.state is ConnectionState.OPEN:
            self.closed = CloseReason(code, reason)
            try:
                await self._send(CloseConnection(code=code, reason=reason))
            except ConnectionClosed:
                pass
        self.closed = self.closed or CloseReason(code, reason)
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


async def accept(stream: trio.abc.Stream, raw: bytes, pick: Callable[[Iterable[str]], str | None], *,
                 max_message: int) -> WebSocket:
    """Server side: `raw` holds the client's upgrade request exactly as it arrived."""
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(raw)
    while True:
        for event in ws.events():
            if isinstance(event, Request):
                subprotocol = pick(event.subprotocols)
                socket = WebSocket(stream, ws, max_message=max_message, subprotocol=subprotocol)
                await socket._send(AcceptConnection(subprotocol=subprotocol))
                return socket
            raise HandshakeFailed(type(event).__name__)
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise HandshakeFailed("client left during the handshake")
        ws.receive_data(data)


async def connect(stream: trio.abc.Stream, host: str, resource: str, headers: list[tuple[bytes, bytes]], *,
                  max_message: int) -> WebSocket:
    """Client side over an open stream (the caller bounds the time)."""
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=host, target=resource, extra_headers=headers)))
    while True:
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return WebSocket(stream, ws, max_message=max_message, subprotocol=event.subprotocol)
            if isinstance(event, (RejectConnection, RejectData)):
                raise HandshakeFailed(f"upstream refused the websocket ({getattr(event, 'status_code', '?')})")
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise HandshakeFailed("upstream closed during the handshake")
        ws.receive_data(data)
