"""Writing a streamed request body into an open file without stalling the agent for long.

A write of one received chunk (at most 1 MiB) into the page cache is cheaper inline than a hop to a
worker thread (measured: about half the CPU per GiB), so writes start inline; the first write that
takes longer than `SLOW_WRITE_SECONDS` (the kernel throttling dirty pages to a slow disk) moves the
rest of that body to worker threads. It must never buffer more than the chunk it was handed.
"""

from __future__ import annotations

import os
import time

import trio

SLOW_WRITE_SECONDS = 0.05


class BodyFile:
    """Appends chunks to the file descriptor `fd` (owned by the caller)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0
        self._threaded = False

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._threaded:
            await trio.to_thread.run_sync(write_all, self.fd, chunk)
        else:
            started = time.perf_counter()
            write_all(self.fd, chunk)
            self._threaded = time.perf_counter() - started > SLOW_WRITE_SECONDS
            await trio.lowlevel.checkpoint()
        self.written += len(chunk)


def write_all(fd: int, chunk: bytes | bytearray | memoryview) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]
