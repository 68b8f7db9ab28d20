"""Reading and writing a trio SocketStream's descriptor directly, for the per-message hot paths (the
console relay, the poller's small calls), and moving whole bodies socket to socket with splice
(`Splice`, below: the zero-copy bulk path of gateway/streams.py).

trio's SocketStream makes every successful send and receive a checkpoint, a scheduler pass each;
on paths that move one small message per wakeup that pass is most of the cost (a 2-hop relay round
trip on one core: 79 µs through SocketStream, 30 µs like this). Here a read first waits until the
socket is readable (so every read still is a checkpoint, and a flooding peer cannot starve other
tasks), then reads once; a write goes straight to the socket and waits only when the kernel's
buffer is full. The stream keeps owning the socket: closing it wakes these waits with
ClosedResourceError, and a closed socket is never touched by number (descriptors are reused)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Awaitable, Callable

import trio


def _descriptor(stream: trio.SocketStream) -> int:
    fd = stream.socket.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("socket closed")
    return fd


async def receive_some(stream: trio.SocketStream, max_bytes: int) -> bytes:
    """Up to `max_bytes`, once any arrived; b"" at the end of the stream. OSError on a reset."""
    while True:
        await trio.lowlevel.wait_readable(_descriptor(stream))
        try:
            return os.read(_descriptor(stream), max_bytes)
        except BlockingIOError:
            continue


async def send_all(stream: trio.SocketStream, data: bytes) -> None:
    """All of `data`; OSError (BrokenPipeError, ConnectionResetError) if the peer is gone."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(_descriptor(stream), view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(_descriptor(stream))


# --- zero-copy bodies ----------------------------------------------------------------------------
#
# A body with a known length that the gateway does not look at goes socket → pipe → socket with
# os.splice (HAProxy's approach): the bytes stay in the kernel, Python only counts them. The pipe is
# the only buffer (at most SPLICE_PIPE_BYTES, kernel memory, never RSS), and it is drained before the
# next read, so a slow sink stops the reads and TCP pushes back on the source as on the copy path.
# Every wait is a checkpoint and is bounded by the idle timeout; the pipe is closed on every exit.

SPLICE_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
COPY_SIZE = 256 * 1024


class Splice:
    """`length` body bytes still to come from `source`, moved to a sink socket by the kernel.

    h11's sendfile pattern (its docs, `Data`): the object rides in an `h11.Data` event, h11 frames it
    by `len()`, and the code that writes h11's output calls `write_to` for it instead of `send_all`.
    A source that ends early or fails raises `source_failed(reason, stalled)` (the caller's error for
    that side); a sink that fails raises trio.BrokenResourceError, as `send_all` does. Either is not a
    socket (a test double, TLS): the bytes are copied through Python instead, same rules."""

    def __init__(self, source: trio.abc.Stream, length: int, idle_timeout: float,
                 source_failed: Callable[[str, bool], Exception]) -> None:
        self.source = source
        self.length = length
        self.idle_timeout = idle_timeout
        self.source_failed = source_failed

    def __len__(self) -> int:
        return self.length

    async def write_to(self, sink: trio.abc.Stream) -> None:
        if isinstance(self.source, trio.SocketStream) and isinstance(sink, trio.SocketStream):
            await self._splice(self.source, sink)
        else:
            await self._copy(sink)

    async def _splice(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # a smaller pipe (pipe-max-size) only means more turns
                fcntl.fcntl(write_end, _F_SETPIPE_SZ, SPLICE_PIPE_BYTES)
            remaining = self.length
            while remaining:
                try:
                    moved = os.splice(_descriptor(source), write_end, min(remaining, SPLICE_PIPE_BYTES),
                                      flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await self._wait(trio.lowlevel.wait_readable, source, "source")
                    continue
                except OSError as exc:
                    raise self.source_failed(f"source failed mid-body: {exc.strerror or exc}", False) from exc
                if moved == 0:
                    raise self.source_failed(f"source closed {remaining} bytes before the end of the body", False)
                remaining -= moved
                while moved:
                    try:
                        moved -= os.splice(read_end, _descriptor(sink), moved,
                                           flags=_SPLICE_FLAGS | (os.SPLICE_F_MORE if remaining else 0))
                    except BlockingIOError:
                        await self._wait(trio.lowlevel.wait_writable, sink, "sink")
                    except OSError as exc:
                        raise trio.BrokenResourceError(f"sink failed mid-body: {exc.strerror or exc}") from exc
                await trio.lowlevel.checkpoint()  # a source that is always readable must not starve others
        finally:
            os.close(read_end)
            os.close(write_end)

    async def _wait(self, wait: Callable[[int], Awaitable[None]], stream: trio.SocketStream, side: str) -> None:
        with trio.move_on_after(self.idle_timeout):
            await wait(_descriptor(stream))
            return
        if side == "source":
            raise self.source_failed("source stalled mid-body", True)
        raise trio.BrokenResourceError("sink stalled mid-body")

    async def _copy(self, sink: trio.abc.Stream) -> None:
        remaining = self.length
        while remaining:
            with trio.move_on_after(self.idle_timeout) as scope:
                try:
                    data = await self.source.receive_some(min(remaining, COPY_SIZE))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise self.source_failed(f"source failed mid-body: {exc}", False) from exc
            if scope.cancelled_caught:
                raise self.source_failed("source stalled mid-body", True)
            if not data:
                raise self.source_failed(f"source closed {remaining} bytes before the end of the body", False)
            remaining -= len(data)
            await sink.send_all(data)
