"""The data plane's HTTP/1.1 client to agents and dev containers: raw trio + h11 with a small
keep-alive pool per (host, port). Bodies flow chunk by chunk in both directions and are never held
whole; reading is what pulls bytes off the socket, so a slow consumer slows the producer (TCP
backpressure end to end). A response that ends before its framing says it should raises
UpstreamBroken, so a truncated body is never mistaken for a complete one.

httpx is the right tool for the agent's small JSON calls (gateway/agent_client.py); this module is for
streams and protocol upgrades, which need the socket itself."""

from __future__ import annotations

import math
import select
from collections import defaultdict
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import h11
import trio

from .fdio import Splice
from .outbound import check_request

RECEIVE_SIZE = 256 * 1024

Headers = list[tuple[bytes, bytes]]
T = TypeVar("T")


class UpstreamError(Exception):
    """The upstream could not be reached or answered with something that is not HTTP."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamBroken(UpstreamError):
    """The upstream went away in the middle of a message."""


@dataclass
class UpstreamResponse:
    status: int
    headers: Headers
    _connection: _Connection
    _done: bool = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def body(self, *, idle_timeout: float = math.inf) -> AsyncIterator[bytes]:
        """The response body chunk by chunk; `idle_timeout` bounds each wait for the next bytes."""
        conn = self._connection
        while not self._done:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_after(idle_timeout) as scope:
                    data = await conn.receive()
                if scope.cancelled_caught:
                    raise UpstreamTimeout("upstream stalled mid-body")
                conn.h11.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                yield event.data
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
            else:
                raise UpstreamBroken(f"unexpected {type(event).__name__} in body")

    async def read_all(self, limit: int = 1024 * 1024) -> bytes:
        """For small bodies only (errors, JSON); refuses to hold more than `limit` bytes."""
        parts = bytearray()
        async for chunk in self.body():
            parts += chunk
            if len(parts) > limit:
                raise UpstreamError("upstream body larger than expected")
        return bytes(parts)

    def detach_body(self) -> tuple[trio.SocketStream, bytes]:
        """For a zero-copy relay of the body (gateway/streams.py): the socket and the body bytes already
        read past the head. h11 never sees the rest, so the connection is closed afterwards, not kept."""
        self._connection.reusable = False
        self._done = True
        trailing, _ = self._connection.h11.trailing_data
        return self._connection.stream, bytes(trailing)

    def take_over(self) -> tuple[trio.SocketStream, bytes]:
        """After a 101 Switching Protocols: the raw socket and bytes already read past the head."""
        self._connection.reusable = False
        self._connection.taken = True
        trailing, _ = self._connection.h11.trailing_data
        return self._connection.stream, bytes(trailing)


@dataclass
class _Connection:
    stream: trio.SocketStream
    h11: h11.Connection
    reusable: bool = True
    taken: bool = False

    async def receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamBroken(str(exc)) from exc
        return data

    async def send(self, event: object) -> None:
        try:
            for piece in self.h11.send_with_data_passthrough(event) or ():  # type: ignore[arg-type]  # h11.Event
                if isinstance(piece, Splice):  # a zero-copy body run (gateway/fdio.py): it writes itself
                    await piece.write_to(self.stream)
                elif piece:
                    await self.stream.send_all(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamBroken(str(exc)) from exc

    async def send_whole(self, head: h11.Request, body: bytes | bytearray | None) -> None:  # type: ignore[name-defined]  # the h11 field shadows the module here
        parts = [self.h11.send(head) or b""]
        if body:
            parts.append(self.h11.send(h11.Data(data=body)) or b"")  # type: ignore[arg-type]  # h11 takes any bytes-like
        parts.append(self.h11.send(h11.EndOfMessage()) or b"")
        try:
            await self.stream.send_all(b"".join(parts))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamBroken(str(exc)) from exc


@dataclass
class UpstreamPool:
    connect_timeout: float = 5.0
    response_timeout: float = 30.0
    max_idle_per_host: int = 32
    _idle: dict[tuple[str, int], list[_Connection]] = field(default_factory=lambda: defaultdict(list))

    async def _connect(self, host: str, port: int) -> _Connection:
        connection = await take_idle(self._idle[(host, port)], lambda c: c.stream)
        if connection is not None:
            return connection
        return _Connection(await open_stream(host, port, self.connect_timeout), h11.Connection(h11.CLIENT))

    @asynccontextmanager
    async def request(
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: Headers,
        body: AsyncIterable[bytes | Splice] | bytes | None = None,
    ) -> AsyncIterator[UpstreamResponse]:
        """Send a request (streaming `body` if it is an async iterable) and yield the response head;
        the body is read from the response inside the block. The connection returns to the pool only
        when both messages completed cleanly. A target or header that would not go out as one
        well-formed request is refused (OutboundRefused, a 400) before anything is sent."""
        check_request(target, headers)
        connection = await self._connect(host, port)
        response: UpstreamResponse | None = None
        try:
            if not any(k == b"host" for k, _ in headers):
                headers = [(b"host", f"{host}:{port}".encode()), *headers]
            if body is None or isinstance(body, (bytes, bytearray)):
                # A small request goes out in one write: head, body and end together.
                await connection.send_whole(h11.Request(method=method, target=target, headers=headers), body)
            else:
                await connection.send(h11.Request(method=method, target=target, headers=headers))
                async for chunk in body:
                    if chunk:
                        await connection.send(h11.Data(data=chunk))  # type: ignore[arg-type]  # a Splice passes through h11 untouched
                await connection.send(h11.EndOfMessage())
            response = await self._read_head(connection)
            yield response
        except h11.ProtocolError as exc:
            connection.reusable = False
            raise UpstreamBroken(f"protocol error: {exc}") from exc
        except BaseException:
            connection.reusable = False
            raise
        finally:
            await self._finish(host, port, connection, response)

    async def _read_head(self, connection: _Connection) -> UpstreamResponse:
        with trio.move_on_after(self.response_timeout) as scope:
            while True:
                event = connection.h11.next_event()
                if event is h11.NEED_DATA:
                    connection.h11.receive_data(await connection.receive())
                    continue
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        return UpstreamResponse(101, list(event.headers), connection, _done=True)
                    continue
                if isinstance(event, h11.Response):
                    return UpstreamResponse(event.status_code, [(k, v) for k, v in event.headers], connection)
                raise UpstreamBroken(f"upstream closed before answering ({type(event).__name__})")
        assert scope.cancelled_caught
        raise UpstreamTimeout("upstream did not answer in time")

    async def _finish(self, host: str, port: int, connection: _Connection,
                      response: UpstreamResponse | None) -> None:
        if connection.taken:
            return  # after a protocol switch the socket belongs to the caller
        reusable = (
            connection.reusable and response is not None
            and connection.h11.our_state is h11.DONE and connection.h11.their_state is h11.DONE
        )
        if reusable:
            try:
                connection.h11.start_next_cycle()
            except h11.LocalProtocolError:
                reusable = False
        idle = self._idle[(host, port)]
        if reusable and len(idle) < self.max_idle_per_host:
            idle.append(connection)
            return
        with trio.CancelScope(shield=True):
            await connection.stream.aclose()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                with trio.CancelScope(shield=True):
                    await connection.stream.aclose()
        self._idle.clear()


async def open_stream(host: str, port: int, timeout: float) -> trio.SocketStream:
    """A new connection within `timeout`; UpstreamError (UpstreamTimeout) when there is none."""
    with trio.move_on_after(timeout):
        try:
            return await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    raise UpstreamTimeout(f"connect to {host}:{port} timed out")


async def take_idle(idle: list[T], stream_of: Callable[[T], trio.SocketStream]) -> T | None:
    """The most recently kept connection the peer has not closed; the closed ones are dropped."""
    while idle:
        kept = idle.pop()
        if not peer_closed(stream_of(kept)):
            return kept
        await stream_of(kept).aclose()
    return None


def peer_closed(stream: trio.SocketStream) -> bool:
    """True when an idle socket is readable: the peer closed it (or sent bytes nobody asked for).
    poll(), not select(): select() refuses descriptors past 1024, and a fleet holds thousands."""
    poller = select.poll()
    try:
        poller.register(stream.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True
