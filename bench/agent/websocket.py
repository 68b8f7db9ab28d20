"""A websocket over an already-upgraded trio stream, framed by wsproto (no extensions).

The HTTP server does the handshake and hands the socket here. Sending awaits the socket, so a slow
peer slows the sender (backpressure) instead of growing a queue. Pings are answered while receiving.
One task may receive while another sends; `close` only sends the close frame, and `finish` (called by
the server once the handler returned) waits briefly for the peer's reply before the socket closes.

It must never buffer more than one incoming message, and never more than `max_message_size` of it.
"""

from __future__ import annotations

from collections import deque

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    TextMessage,
)

RECEIVE_CHUNK = 64 << 10
DEFAULT_MAX_MESSAGE = 16 << 20
CLOSE_WAIT_SECONDS = 2.0
NORMAL_CLOSURE = 1000
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
ABNORMAL_CLOSURE = 1006


class WebSocketClosed(Exception):
    """Sending on a websocket that is closing or closed."""


class WebSocket:
    def __init__(
        self,
        stream: trio.abc.Stream,
        buffered: bytes = b"",
        max_message_size: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self._stream = stream
        self._protocol = Connection(ConnectionType.SERVER)
        self._events: deque[Event] = deque()
        self._send_lock = trio.StrictFIFOLock()
        self._max_message_size = max_message_size
        self._peer_gone = False
        self.close_code: int | None = None
        if buffered:
            self._protocol.receive_data(buffered)

    @property
    def is_open(self) -> bool:
        return self._protocol.state is ConnectionState.OPEN

    async def receive(self) -> str | bytes | None:
        """The next whole message, or None once the websocket is closed (by either side)."""
        texts: list[str] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if event is None:
                return None
            if isinstance(event, (TextMessage, BytesMessage)):
                if isinstance(event, TextMessage):
                    texts.append(event.data)
                else:
                    chunks.append(bytes(event.data))
                size += len(event.data)
                if size > self._max_message_size:
                    await self.close(MESSAGE_TOO_BIG, "message too big")
                    return None
                if event.message_finished:
                    return "".join(texts) if isinstance(event, TextMessage) else b"".join(chunks)
            elif isinstance(event, Ping):
                await self._send_quietly(event.response())
            elif isinstance(event, CloseConnection):
                await self._answer_close(event)
                return None

    async def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            await self._send_event(TextMessage(data=message))
        else:
            await self._send_event(BytesMessage(data=message))

    async def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake; a no-op when it already started."""
        if self.is_open:
            self.close_code = code
            try:
                await self._send_event(CloseConnection(code=code, reason=reason))
            except (WebSocketClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                self._peer_gone = True

    async def finish(self) -> None:
        """Close politely if nobody did, then wait a little for the peer's close frame."""
        await self.close()
        with trio.move_on_after(CLOSE_WAIT_SECONDS):
            while not self._peer_gone and self._protocol.state is not ConnectionState.CLOSED:
                if await self._next_event() is None:
                    break

    async def _next_event(self) -> Event | None:
        while not self._events:
            self._events.extend(self._protocol.events())
            if self._events:
                break
            if self._peer_gone:
                return None
            try:
                data = await self._stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._peer_gone = True
                if self.close_code is None:
                    self.close_code = ABNORMAL_CLOSURE
                return None
            self._protocol.receive_data(bytes(data))
        return self._events.popleft()

    async def _answer_close(self, event: CloseConnection) -> None:
        if self.close_code is None:
            self.close_code = event.code
        if self._protocol.state is ConnectionState.REMOTE_CLOSING:
            await self._send_quietly(event.response())
        elif self._protocol.state is ConnectionState.OPEN:
            # wsproto reports a framing error as a close event without changing state.
            await self._send_quietly(CloseConnection(code=event.code, reason=event.reason or ""))

    async def _send_quietly(self, event: Event) -> None:
        try:
            await self._send_event(event)
        except (WebSocketClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            self._peer_gone = True

    async def _send_event(self, event: Event) -> None:
        async with self._send_lock:
            state = self._protocol.state
            closing_reply = isinstance(event, CloseConnection) and state in (
                ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)
            if state is not ConnectionState.OPEN and not closing_reply:
                raise WebSocketClosed(f"websocket is {state.name}")
            data = self._protocol.send(event)
            await self._stream.send_all(data)

