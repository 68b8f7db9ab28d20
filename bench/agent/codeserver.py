"""The dev IDE on the agent's IDE port: the built-in stand-in, or a real code-server command.

`/dev/codeserver/start|stop|restart` turn it on and off; the port stays the same for the agent's
life. For the built-in IDE the port is reserved by a bound socket that listens only while the IDE
runs (a stopped IDE refuses connections, like a stopped code-server). With `--codeserver-command`
the template's `{port}` and `{data}` are filled in and the process is started in its own session,
its output going to `DATA/codeserver.log`; start waits until the port accepts connections. It must
never leave the IDE process running when the agent is cancelled.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import trio

from bench.agent.http import ApiError, Request, Response, json_response, serve_listeners
from bench.agent.ide import serve_ide_request

STOP_GRACE_SECONDS = 5.0
START_TIMEOUT_SECONDS = 30.0


class CodeServer:
    def __init__(self, host: str, port: int, command: str | None, data_dir: Path,
                 nursery: trio.Nursery) -> None:
        self.host = host
        self.command = command
        self.data_dir = data_dir
        self.nursery = nursery
        self._reserved: socket.socket | None = None
        if command is None:
            self._reserved = bound_socket(host, port)
            self.port: int = self._reserved.getsockname()[1]
        else:
            self.port = port or free_port(host)
        self._scope: trio.CancelScope | None = None
        self._finished = trio.Event()
        self._switching = trio.Lock()  # one start/stop at a time

    @property
    def running(self) -> bool:
        return self._scope is not None

    def describe(self) -> dict[str, object]:
        return {"running": self.running, "port": self.port,
                "mode": "builtin" if self.command is None else "command"}

    async def start(self) -> None:
        async with self._switching:
            if self.running:
                return
            self._finished = trio.Event()
            await self.nursery.start(
                self._serve_builtin if self.command is None else self._run_command)

    async def stop(self) -> None:
        async with self._switching:
            if self._scope is not None:
                self._scope.cancel()
                await self._finished.wait()

    def close(self) -> None:
        """Give the reserved port back (the agent is shutting down)."""
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    async def _serve_builtin(self, task_status: trio.TaskStatus[None]) -> None:
        assert self._reserved is not None
        sock, self._reserved = self._reserved, None
        sock.listen(socket.SOMAXCONN)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                await serve_listeners(serve_ide_request, [listener], task_status=task_status)
            finally:
                self._reserved = bound_socket(self.host, self.port)
                self._scope = None
                self._finished.set()

    async def _run_command(self, task_status: trio.TaskStatus[None]) -> None:
        assert self.command is not None
        argv = [word.format(port=self.port, data=self.data_dir)
                for word in shlex.split(self.command)]
        log = os.open(self.data_dir / "codeserver.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                try:
                    process = await trio.lowlevel.open_process(
                        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                        cwd=self.data_dir, start_new_session=True)
                except OSError as exc:
                    raise ApiError(500, "CODESERVER_FAILED", {"reason": str(exc)}) from exc
                try:
                    await self._wait_listening(process)
                    task_status.started()
                    await process.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        await end_process_group(process)
        finally:
            os.close(log)
            self._scope = None
            self._finished.set()

    async def _wait_listening(self, process: trio.Process) -> None:
        with trio.move_on_after(START_TIMEOUT_SECONDS):
            while process.returncode is None:
                try:
                    stream = await trio.open_tcp_stream(self.host, self.port)
                except OSError:
                    await trio.sleep(0.1)
                    continue
                await stream.aclose()
                return

    async def status_route(self, request: Request) -> Response:
        return json_response(self.describe())

    async def start_route(self, request: Request) -> Response:
        await self.start()
        return json_response(self.describe())

    async def stop_route(self, request: Request) -> Response:
        await self.stop()
        return json_response(self.describe())

    async def restart_route(self, request: Request) -> Response:
        await self.stop()
        await self.start()
        return json_response(self.describe())


def bound_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


async def end_process_group(process: trio.Process) -> None:
    """SIGTERM the process's session, SIGKILL it after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.returncode is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        with trio.move_on_after(STOP_GRACE_SECONDS):
            await process.wait()
