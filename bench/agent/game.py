"""Supervising the game server: one real child process whose stdin/stdout/stderr are the console.

`GameServer` starts the process, pumps every output line into the `ConsoleLog`, derives the
lifecycle state (a line matching the ready pattern means running; who joined and left from the
output) and stops it by writing the stop command, then SIGTERM, then SIGKILL. Each run of the process
is one task in the agent's nursery. It must never change state except through `lifecycle.next_state`,
and never leave a child process behind when the agent is cancelled.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.agent.consolelog import ConsoleLog
from bench.agent.lifecycle import GameEvent, GameState, next_state

MAX_LINE_BYTES = 64 << 10
DRAIN_SECONDS = 1.0
TERM_GRACE_SECONDS = 2.0
JOINED = re.compile(r"(?:^|[\s:])(\w{1,32}) joined the game")
LEFT = re.compile(r"(?:^|[\s:])(\w{1,32}) left the game")
ONLINE = re.compile(r"players online:(.*)$")
REPO_ROOT = Path(__file__).resolve().parents[2]


class ConsoleUnavailable(Exception):
    """A console command while no game server process reads its console."""

    def __init__(self, state: GameState) -> None:
        super().__init__(f"game server is {state.value}")
        self.state = state


@dataclass(frozen=True)
class GameConfig:
    argv: list[str]
    cwd: Path
    ready_pattern: str
    stop_command: str
    stop_timeout: float


def builtin_argv(log_interval: float) -> list[str]:
    """The command line of the fake game server shipped with the agent."""
    return [sys.executable, "-u", "-m", "bench.agent.gameserver",
            "--log-interval", str(log_interval)]


def command_argv(template: str, data_dir: Path, files_dir: Path) -> list[str]:
    """`--game-command` split like a shell would, with `{data}` and `{files}` filled in."""
    return [word.format(data=data_dir, files=files_dir) for word in shlex.split(template)]


class GameServer:
    def __init__(self, config: GameConfig, log: ConsoleLog, nursery: trio.Nursery) -> None:
        self.config = config
        self.log = log
        self.nursery = nursery
        self.state = GameState.INSTALLING
        self.players: dict[str, None] = {}
        self.process: trio.Process | None = None
        self._ready = re.compile(config.ready_pattern) if config.ready_pattern else None
        self._stdin_lock = trio.Lock()
        self._exited = trio.Event()
        self._exited.set()

    def transition(self, event: GameEvent) -> GameState:
        self.state = next_state(self.state, event)
        self.log.append_state(self.state.value)
        return self.state

    async def start(self) -> GameState:
        self.transition(GameEvent.START)
        self._exited = trio.Event()
        await self.nursery.start(self._run)
        return self.state

    async def stop(self) -> GameState:
        self.transition(GameEvent.STOP)
        if self.process is not None:
            self.nursery.start_soon(self._ask_to_stop, self.process)
        return self.state

    async def restart(self) -> GameState:
        """Stop if alive, then start again once the process exited (in the background)."""
        if self.state in (GameState.STARTING, GameState.RUNNING):
            await self.stop()
            self.nursery.start_soon(self._start_after_exit)
            return self.state
        return await self.start()

    async def _start_after_exit(self) -> None:
        await self._exited.wait()
        if self.state in (GameState.STOPPED, GameState.CRASHED):
            await self.start()

    async def send_command(self, command: str) -> None:
        process = self.process
        if self.state not in (GameState.STARTING, GameState.RUNNING) or process is None:
            raise ConsoleUnavailable(self.state)
        try:
            await self._write_stdin(process, command)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConsoleUnavailable(self.state) from None

    async def _write_stdin(self, process: trio.Process, line: str) -> None:
        assert process.stdin is not None
        async with self._stdin_lock:
            await process.stdin.send_all(line.encode() + b"\n")

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            process = await trio.lowlevel.open_process(
                self.config.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, cwd=self.config.cwd, env=env, start_new_session=True)
        except OSError as exc:
            self.log.append_line(f"[agent] cannot start the game server: {exc}")
            self.transition(GameEvent.EXITED_FAILED)
            self._exited.set()
            task_status.started()
            return
        self.process = process
        if self.state is GameState.STOPPING:
            self.nursery.start_soon(self._ask_to_stop, process)
        elif self._ready is None:
            self.transition(GameEvent.READY)
        task_status.started()
        try:
            async with trio.open_nursery() as pumps:
                assert process.stdout is not None and process.stderr is not None
                pumps.start_soon(self._pump, process.stdout)
                pumps.start_soon(self._pump, process.stderr)
                await process.wait()
                # A grandchild may hold the pipes open: bound the wait for their EOF.
                pumps.cancel_scope.deadline = trio.current_time() + DRAIN_SECONDS
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    kill_group(process)
                    await process.wait()
                for pipe in (process.stdin, process.stdout, process.stderr):
                    if pipe is not None:
                        await pipe.aclose()
            self.process = None
            self.players.clear()
        self.transition(GameEvent.EXITED_CLEAN if process.returncode == 0 else GameEvent.EXITED_FAILED)
        self.log.append_line(f"[agent] game server exited with code {process.returncode}")
        self._exited.set()

    async def _ask_to_stop(self, process: trio.Process) -> None:
        """The stop command, then SIGTERM after `stop_timeout`, then SIGKILL for the session."""
        with trio.move_on_after(self.config.stop_timeout):
            try:
                await self._write_stdin(process, self.config.stop_command)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await process.wait()
            return
        process.terminate()
        with trio.move_on_after(TERM_GRACE_SECONDS):
            await process.wait()
            return
        kill_group(process)

    async def _pump(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        while data := await stream.receive_some(MAX_LINE_BYTES):
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                self._observe(line)
            if len(pending) >= MAX_LINE_BYTES:
                self._observe(pending)
                pending = b""
        if pending:
            self._observe(pending)

    def _observe(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self.log.append_line(text)
        if self.state is GameState.STARTING and self._ready and self._ready.search(text):
            self.transition(GameEvent.READY)
        if joined := JOINED.search(text):
            self.players[joined.group(1)] = None
        elif left := LEFT.search(text):
            self.players.pop(left.group(1), None)
        elif online := ONLINE.search(text):
            names = [name.strip() for name in online.group(1).split(",")]
            self.players = dict.fromkeys(name for name in names if name)


def kill_group(process: trio.Process) -> None:
    """SIGKILL the process and everything it started in its session."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def make_game_config(
    *,
    game_command: str | None,
    data_dir: Path,
    files_dir: Path,
    log_interval: float,
    ready_pattern: str,
    stop_timeout: float,
) -> GameConfig:
    argv = (command_argv(game_command, data_dir, files_dir) if game_command
            else builtin_argv(log_interval))
    return GameConfig(argv, files_dir, ready_pattern, "stop", stop_timeout)
