"""Reading and writing a trio SocketStream's descriptor directly, for the per-message hot paths (the
console relay, the poller's small calls).

trio's SocketStream makes every successful send and receive a checkpoint, a scheduler pass each;
on paths that move one small message per wakeup that pass is most of the cost (a 2-hop relay round
trip on one core: 79 µs through SocketStream, 30 µs like this). Here a read first waits until the
socket is readable (so every read still is a checkpoint, and a flooding peer cannot starve other
tasks), then reads once; a write goes straight to the socket and waits only when the kernel's
buffer is full. The stream keeps owning the socket: closing it wakes these waits with
ClosedResourceError, and a closed socket is never touched by number (descriptors are reused)."""

from __future__ import annotations

import os

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
