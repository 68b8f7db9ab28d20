"""What the gateway's poller reads: `/health`, `/ready`, `/status`, `/version`, `/update`, `/players`.

Readiness is semantic: the agent is ready once its simulated install finished (any state but
`installing`). Resource figures come from /proc for the game server process and from walking
`DATA/files/` (cached, in a worker thread). The version is persisted in `DATA/agent.json` so an
applied update survives a restart. It must never answer a poll slowly: nothing here waits for the
game server.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import trio

from bench.agent.backups import BackupManager
from bench.agent.game import GameServer
from bench.agent.http import ApiError, Request, Response, json_response
from bench.agent.lifecycle import GameState

DISK_CACHE_SECONDS = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class ResourceSampler:
    """CPU and memory of one process from /proc, disk use of a directory tree."""

    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self._cpu_sample: tuple[int, float, int] | None = None  # pid, when, ticks
        self._disk_bytes = 0
        self._disk_measured_at = float("-inf")
        self._disk_lock = trio.Lock()

    def cpu_and_memory(self, pid: int | None) -> tuple[float, int]:
        if pid is None:
            self._cpu_sample = None
            return 0.0, 0
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat_file:
                fields = stat_file.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/statm", "rb") as statm_file:
                resident_pages = int(statm_file.read().split()[1])
        except (OSError, IndexError, ValueError):
            return 0.0, 0
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        now = time.monotonic()
        percent = 0.0
        if self._cpu_sample is not None and self._cpu_sample[0] == pid:
            _, then, ticks_then = self._cpu_sample
            if now > then:
                percent = round((ticks - ticks_then) / CLOCK_TICKS / (now - then) * 100, 1)
        self._cpu_sample = (pid, now, ticks)
        return percent, resident_pages * PAGE_SIZE

    async def disk_bytes(self) -> int:
        async with self._disk_lock:
            if trio.current_time() - self._disk_measured_at > DISK_CACHE_SECONDS:
                self._disk_bytes = await trio.to_thread.run_sync(tree_size, self.tree)
                self._disk_measured_at = trio.current_time()
        return self._disk_bytes


def tree_size(tree: Path) -> int:
    total = 0
    for directory, _, names in os.walk(tree):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


class VersionStore:
    """The installed game version, persisted in `DATA/agent.json`."""

    def __init__(self, path: Path, installed: str, latest: str) -> None:
        self.path = path
        self.latest = latest
        self.current = json.loads(path.read_text())["version"] if path.exists() else installed

    @property
    def update_available(self) -> bool:
        return self.current != self.latest

    def apply(self) -> None:
        self.current = self.latest
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps({"version": self.current}))
        os.replace(temp, self.path)


class StatusReporter:
    def __init__(self, game: GameServer, backups: BackupManager, versions: VersionStore,
                 sampler: ResourceSampler) -> None:
        self.game = game
        self.backups = backups
        self.versions = versions
        self.sampler = sampler

    def players(self) -> list[dict[str, str]]:
        return [{"name": name} for name in self.game.players]

    async def health(self, request: Request) -> Response:
        return json_response({"ok": True})

    async def ready(self, request: Request) -> Response:
        state = self.game.state
        return json_response({"ready": state is not GameState.INSTALLING, "state": state.value})

    async def status(self, request: Request) -> Response:
        process = self.game.process
        cpu, memory = self.sampler.cpu_and_memory(process.pid if process else None)
        players = self.players()
        payload: dict[str, Any] = {
            "state": self.game.state.value,
            "players": players,
            "playerCount": len(players),
            "version": self.versions.current,
            "updateAvailable": self.versions.update_available,
            "resources": {"cpuPercent": cpu, "memoryBytes": memory,
                          "diskBytes": await self.sampler.disk_bytes()},
            "operations": [op.describe() for op in self.backups.operations],
            "consoleSeq": self.game.log.last_seq,
        }
        return json_response(payload)

    async def version(self, request: Request) -> Response:
        return json_response({"version": self.versions.current})

    async def update_info(self, request: Request) -> Response:
        return json_response(self.describe_update())

    def describe_update(self) -> dict[str, Any]:
        return {"updateAvailable": self.versions.update_available,
                "current": self.versions.current, "latest": self.versions.latest}

    async def apply_update(self, request: Request) -> Response:
        """Apply the update; only while the game server is stopped (or crashed)."""
        state = self.game.state
        if state not in (GameState.STOPPED, GameState.CRASHED):
            raise ApiError(409, "CONFLICT", {"reason": "stop the server first",
                                             "state": state.value})
        updated = self.versions.update_available
        self.versions.apply()
        return json_response({"updated": updated, **self.describe_update()})

    async def list_players(self, request: Request) -> Response:
        return json_response({"players": self.players()})
