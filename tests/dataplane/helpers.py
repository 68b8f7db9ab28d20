"""Helpers for data-plane tests: raw streaming bodies that are generated and discarded on the fly,
and memory readings of this process (the gateway runs in-process)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from tests.conftest import Gateway

CHUNK = b"\x5a" * (1024 * 1024)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    """Samples this process's RSS while a transfer runs."""

    def __init__(self) -> None:
        self.start = rss_bytes()
        self.peak = self.start

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.peak = max(self.peak, rss_bytes())
            await trio.sleep(0.05)

    @property
    def growth(self) -> int:
        return self.peak - self.start


async def generated(size: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < size:
        piece = CHUNK[: min(len(CHUNK), size - sent)]
        sent += len(piece)
        yield piece


def container_dir(gateway: Gateway, vmid: int) -> Path:
    return gateway.settings.data_dir / "containers" / str(vmid)


def agent_files(gateway: Gateway, vmid: int) -> Path:
    return container_dir(gateway, vmid) / "data" / "files"


def agent_pid(gateway: Gateway, vmid: int) -> int:
    return json.loads((container_dir(gateway, vmid) / "container.json").read_text())["pid"]


def kill_agent(gateway: Gateway, vmid: int) -> None:
    os.kill(agent_pid(gateway, vmid), signal.SIGKILL)


def make_sparse_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)
