"""What the bench suite reads about the machine and the processes it measures, from /proc only.

CPU time and memory of a process tree (the gateway, nginx's master and worker), per-core busy time
(so a reader can see whether the proxy's core or the load generators' core was saturated), and the
pinning plan: the proxy under test gets core 0, everything else (agents, load generators, this
process) the other cores. It must never write anywhere but a process's `clear_refs` (to reset its
peak RSS), and never guess a figure it could not read: a missing value is None.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class CorePlan:
    """Which cores the proxy under test runs on and which cores everything else uses."""

    proxy: frozenset[int]
    load: frozenset[int]

    @property
    def shared(self) -> bool:
        """True on a one-core machine, where the proxy and the load share the core."""
        return bool(self.proxy & self.load)

    def describe(self) -> str:
        if self.shared:
            return f"one core ({sorted(self.proxy)}): proxy and load generators share it"
        return f"proxy on cores {sorted(self.proxy)}, agents + load generators on {sorted(self.load)}"


def core_plan() -> CorePlan:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return CorePlan(frozenset(cores), frozenset(cores))
    return CorePlan(frozenset(cores[:1]), frozenset(cores[1:]))


def pin(pid: int, cores: frozenset[int]) -> None:
    """Pin every thread of `pid` (already running) to `cores`."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except (ProcessLookupError, PermissionError):
            pass


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (nginx's workers, an agent's game server)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        tree.append(current)
        frontier.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time consumed so far by `pids` (each process's own threads)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes(pids: list[int]) -> int | None:
    """Resident memory of `pids` together, or None when none of them could be read."""
    values = [_status_kib(pid, "VmRSS") for pid in pids]
    known = [v for v in values if v is not None]
    return sum(known) * 1024 if known else None


def peak_rss_bytes(pids: list[int]) -> int | None:
    """Peak resident memory (VmHWM) since start or since the last `reset_peak_rss`."""
    values = [_status_kib(pid, "VmHWM") for pid in pids]
    known = [v for v in values if v is not None]
    return sum(known) * 1024 if known else None


def reset_peak_rss(pids: list[int]) -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass


@dataclass(frozen=True)
class CoreTimes:
    busy: dict[int, int]
    total: dict[int, int]


def core_times() -> CoreTimes:
    busy: dict[int, int] = {}
    total: dict[int, int] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        ticks = [int(v) for v in values[:8]]
        idle = ticks[3] + ticks[4]
        core = int(name[3:])
        total[core] = sum(ticks)
        busy[core] = sum(ticks) - idle
    return CoreTimes(busy, total)


def core_busy(before: CoreTimes, after: CoreTimes) -> dict[int, float]:
    """Fraction of each core's time spent busy between two readings."""
    shares: dict[int, float] = {}
    for core, total in after.total.items():
        elapsed = total - before.total.get(core, 0)
        if elapsed > 0:
            shares[core] = (after.busy[core] - before.busy.get(core, 0)) / elapsed
    return shares


def raise_open_file_limit() -> int:
    """Raise this process's soft fd limit to the hard one (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_disk_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize
