"""The local provider, the embedded default: each "container" is one reference agent process
(`python -m bench.agent`) with its own directory under `<data>/containers/<vmid>/` on a free loopback
port, with a fresh secret. Agents run in their own session, so they outlive a gateway restart the way
containers outlive their control plane; on start the provider re-adopts the ones still answering and
restarts the others (no orphans, no duplicates).

Never leave a process without a record (container.json) or a record without a reason to exist."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from .base import Container, ContainerSpec, ProviderError

log = logging.getLogger("zlh.provider.local")

START_TIMEOUT = 20.0


class LocalProvider:
    name = "local"

    def __init__(self, root: Path, *, agent_args: list[str] | None = None, stop_agents_on_exit: bool = False) -> None:
        self.root = Path(root).resolve() / "containers"  # agents run with their own directory as cwd
        self.agent_args = agent_args or []
        self.stop_agents_on_exit = stop_agents_on_exit
        self._locks: dict[int, trio.Lock] = {}

    def _dir(self, vmid: int) -> Path:
        return self.root / str(vmid)

    def _lock(self, vmid: int) -> trio.Lock:
        return self._locks.setdefault(vmid, trio.Lock())

    def _record(self, vmid: int) -> dict[str, Any] | None:
        path = self._dir(vmid) / "container.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _write_record(self, vmid: int, record: dict[str, Any]) -> None:
        path = self._dir(vmid) / "container.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the agent secret
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        os.replace(tmp, path)

    async def claim_vmid(self, instance_id: int, vmid: int) -> int:
        return vmid  # every directory under root is ours: nothing else can hold a VMID here

    async def create(self, spec: ContainerSpec) -> Container:
        async with self._lock(spec.vmid):
            record = self._record(spec.vmid)
            if record is not None and record.get("secret") == spec.agent_secret:
                return await self._ensure_running(spec.vmid, record)
            directory = self._dir(spec.vmid)
            if directory.exists():
                await self._kill(record)
                shutil.rmtree(directory, ignore_errors=True)
            (directory / "data").mkdir(parents=True)
            record = {"vmid": spec.vmid, "secret": spec.agent_secret, "kind": spec.kind,
                      "engineType": spec.engine_type, "hostname": spec.hostname, "running": True}
            self._write_record(spec.vmid, record)
            return await self._ensure_running(spec.vmid, record)

    async def _ensure_running(self, vmid: int, record: dict[str, Any]) -> Container:
        if await self._answers(record):
            return self._container(vmid, record)
        await self._kill(record)
        port, ide_port, pid = await self._spawn(vmid, record)
        record.update(port=port, idePort=ide_port, pid=pid, running=True)
        self._write_record(vmid, record)
        return self._container(vmid, record)

    def _container(self, vmid: int, record: dict[str, Any]) -> Container:
        return Container(vmid=vmid, provider_ref=str(self._dir(vmid)), agent_host="127.0.0.1",
                         agent_port=int(record["port"]), ide_port=record.get("idePort"))

    async def _spawn(self, vmid: int, record: dict[str, Any]) -> tuple[int, int | None, int]:
        directory = self._dir(vmid)
        log_path = directory / "agent.log"
        secret_file = directory / "agent.secret"
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(record["secret"])
        # The secret goes by file, never on the command line (where `ps` would show it).
        argv = [sys.executable, "-m", "bench.agent", "--data-dir", str(directory / "data"),
                f"--secret-file={secret_file}", "--host", "127.0.0.1", "--port", "0",
                "--ide-port", "0", *self.agent_args]
        if record.get("kind") == "game":
            argv.append("--autostart")

        def start() -> int:
            with open(log_path, "ab") as out:
                process = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                           start_new_session=True, cwd=directory)
            return process.pid

        try:
            pid = await trio.to_thread.run_sync(start)
        except OSError as exc:
            raise ProviderError(f"could not start agent for {vmid}: {exc}") from exc
        with trio.move_on_after(START_TIMEOUT):
            while True:
                announced = _announcement(log_path, pid)
                if announced is not None:
                    return int(announced["port"]), announced.get("idePort"), pid
                if not process_alive(pid):
                    raise ProviderError(f"agent for {vmid} exited at start: {_tail(log_path)}")
                await trio.sleep(0.05)
        _signal(pid, signal.SIGKILL)
        raise ProviderError(f"agent for {vmid} did not start within {START_TIMEOUT:.0f}s")

    async def _answers(self, record: dict[str, Any] | None) -> bool:
        if not record or not record.get("port") or not record.get("pid") or not process_alive(record["pid"]):
            return False
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                response = await http.get(f"http://127.0.0.1:{record['port']}/health",
                                          headers={"authorization": f"Bearer {record['secret']}"})
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    async def _kill(self, record: dict[str, Any] | None) -> None:
        pid = record.get("pid") if record else None
        if not pid or not process_alive(pid):
            return
        _signal(pid, signal.SIGTERM)
        with trio.move_on_after(5):
            while process_alive(pid):
                await trio.sleep(0.05)
        if process_alive(pid):
            _signal(pid, signal.SIGKILL)

    async def start(self, vmid: int) -> None:
        async with self._lock(vmid):
            record = self._record(vmid)
            if record is None:
                raise ProviderError(f"container {vmid} does not exist")
            record["running"] = True
            await self._ensure_running(vmid, record)

    async def stop(self, vmid: int) -> None:
        async with self._lock(vmid):
            record = self._record(vmid)
            if record is None:
                raise ProviderError(f"container {vmid} does not exist")
            await self._kill(record)
            record["running"] = False
            self._write_record(vmid, record)

    async def status(self, vmid: int) -> str:
        record = self._record(vmid)
        if record is None:
            return "missing"
        return "running" if record.get("pid") and process_alive(record["pid"]) else "stopped"

    async def destroy(self, vmid: int) -> None:
        async with self._lock(vmid):
            await self._kill(self._record(vmid))
            await trio.to_thread.run_sync(lambda: shutil.rmtree(self._dir(vmid), ignore_errors=True))
        self._locks.pop(vmid, None)

    async def list_vmids(self) -> set[int]:
        if not self.root.exists():
            return set()
        return {int(p.name) for p in self.root.iterdir() if p.name.isdigit() and (p / "container.json").exists()}

    async def current(self, vmid: int) -> Container | None:
        record = self._record(vmid)
        return self._container(vmid, record) if record and record.get("port") else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Re-adopt agents that survived a restart, restart the ones that did not; on exit stop them
        only when configured to (tests), never in normal operation."""
        for vmid in sorted(await self.list_vmids()):
            record = self._record(vmid)
            if record and record.get("running", True):
                try:
                    async with self._lock(vmid):
                        await self._ensure_running(vmid, record)
                except ProviderError as exc:
                    log.warning("could not re-adopt container %s: %s", vmid, exc)
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            if self.stop_agents_on_exit:
                with trio.CancelScope(shield=True):
                    for vmid in await self.list_vmids():
                        await self._kill(self._record(vmid))


def _announcement(log_path: Path, pid: int) -> dict[str, Any] | None:
    """The JSON line an agent prints once it listens (the newest one from this pid)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{") and '"port"' in line:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if data.get("pid") in (None, pid):
                return data
    return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie child of ours is not alive; reap it.
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
