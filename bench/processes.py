"""Child processes of the bench suite: started pinned to their cores, their output in a log file,
and always stopped — the process group gets SIGTERM, then SIGKILL — when the block that started
them exits, however it exits (error, cancellation, Ctrl-C).

It must never leave a process behind, and never signal a process it did not start.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

STOP_GRACE_SECONDS = 5.0
POLL_SECONDS = 0.05


class BenchError(Exception):
    """Something the suite needs could not be started or measured; the message says what."""


@dataclass
class Child:
    name: str
    process: trio.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    async def wait_for_line(self, parse: Callable[[str], object | None], timeout: float) -> object:
        """The first non-None `parse(line)` over the child's output, waiting up to `timeout`."""
        with trio.move_on_after(timeout):
            while True:
                text = self.log_path.read_text(errors="replace")
                for line in text.splitlines():
                    found = parse(line)
                    if found is not None:
                        return found
                if self.process.poll() is not None:
                    raise BenchError(f"{self.name} exited ({self.process.returncode}):\n{self.tail()}")
                await trio.sleep(POLL_SECONDS)
        raise BenchError(f"{self.name} did not start within {timeout:.0f}s:\n{self.tail()}")


def _pinned(cores: frozenset[int]) -> Callable[[], None]:
    def pin_self() -> None:
        os.sched_setaffinity(0, cores)

    return pin_self


@asynccontextmanager
async def running(
    name: str,
    argv: list[str],
    *,
    cores: frozenset[int],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> AsyncIterator[Child]:
    """Run `argv` as `name` for the duration of the block."""
    log_path = log_dir / f"{name}.log"
    output = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
            preexec_fn=_pinned(cores),
        )
        try:
            yield Child(name, process, log_path)
        finally:
            with trio.CancelScope(shield=True):
                await stop(process)
    finally:
        os.close(output)


async def stop(process: trio.Process) -> None:
    """SIGTERM the process group, wait a little, then SIGKILL it."""
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        with trio.move_on_after(STOP_GRACE_SECONDS):
            await process.wait()
    # Whatever it left in its group (a game server, nginx workers) goes too.
    _signal_group(process.pid, signal.SIGKILL)
    await process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def run_tool(argv: list[str], *, cores: frozenset[int], timeout: float) -> str:
    """Run a short-lived load generator to completion and return its standard output."""
    with trio.fail_after(timeout):
        result = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, preexec_fn=_pinned(cores),
        )
    if result.returncode != 0:
        raise BenchError(f"{argv[0]} failed ({result.returncode}): {result.stderr.decode(errors='replace')[-500:]}")
    return str(result.stdout.decode(errors="replace"))
