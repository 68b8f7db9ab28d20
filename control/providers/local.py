"""The local provider, the embedded default: each "container" is one reference agent process
(`python -m bench.agent`) with its own directory under `<data>/containers/<vmid>/` on a free loopback
port, with a fresh secret. Agents run in their own session, so they outlive a gateway restart the way
containers outlive their control plane; on start the provider re-adopts the ones still answering and
restarts the others (no orphans, no duplicates).

The database, not this directory, says which containers exist: a container's identity (`provider_ref`)
is its directory, recorded before anything is made there (`placement`); on start every directory the
database does not name is an orphan (a dead driver's, superseded) and is reaped, agent and all. A
replica resuming another's provisioning adopts the directory the record names (`find`; linked into this
provider's root, so start/stop/destroy work here too).

Never leave a process without a record (container.json: its pid is written the moment it is spawned,
and any process whose working directory is a container's is that container's) or a record without a
reason to exist."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from .base import Container, ContainerSpec, ProviderError

log = logging.getLogger("zlh.provider.local")

START_TIMEOUT = 20.0


class LocalProvider:
    name = "local"

    def __init__(self, root: Path, *, agent_args: list[str] | None = None, stop_agents_on_exit: bool = False,
                 ide_command: str = "",
                 recorded: Callable[[], Awaitable[dict[int, str | None]]] | None = None) -> None:
        self.root = Path(root).resolve() / "containers"  # agents run with their own directory as cwd
        self.agent_args = agent_args or []
        self.ide_command = ide_command  # a dev container's IDE: a template with {port} and {data}
        self.stop_agents_on_exit = stop_agents_on_exit
        # vmid → provider_ref as the database records them (None: no database, keep every container)
        self.recorded = recorded
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

    def placement(self, spec: ContainerSpec) -> str:
        return str(self._dir(spec.vmid))

    async def claim_vmid(self, instance_id: int, vmid: int) -> int:
        return vmid  # every directory under root is ours: nothing else can hold a VMID here

    async def create(self, spec: ContainerSpec) -> Container:
        async with self._lock(spec.vmid):
            record = self._record(spec.vmid)
            if record is not None and record.get("secret") == spec.agent_secret:
                return await self._ensure_running(spec.vmid, record)
            directory = self._dir(spec.vmid)
            if directory.is_symlink():  # another replica's container, adopted for an older instance
                directory.unlink()
            elif directory.exists():
                await self._kill(record, directory)
                shutil.rmtree(directory, ignore_errors=True)
            (directory / "data").mkdir(parents=True)
            record = {"vmid": spec.vmid, "secret": spec.agent_secret, "kind": spec.kind,
                      "engineType": spec.engine_type, "hostname": spec.hostname, "running": True}
            self._write_record(spec.vmid, record)
            return await self._ensure_running(spec.vmid, record)

    async def find(self, vmid: int, provider_ref: str, agent_secret: str) -> Container | None:
        """Adopt the container directory `provider_ref` (this provider's own, or one a dead replica
        made) if it holds this instance's secret: linked into this root, its agent running."""
        directory = Path(provider_ref)
        if not directory.is_absolute() or directory.name != str(vmid):
            return None
        try:
            record = json.loads((directory / "container.json").read_text())
        except (OSError, ValueError):
            return None
        if record.get("secret") != agent_secret:
            return None
        async with self._lock(vmid):
            mine = self._dir(vmid)
            if mine.resolve() != directory.resolve():
                if mine.is_symlink():
                    mine.unlink()
                elif mine.exists():  # a container of ours the database does not name: superseded
                    await self._kill(self._record(vmid), mine)
                    await trio.to_thread.run_sync(lambda: shutil.rmtree(mine, ignore_errors=True))
                self.root.mkdir(parents=True, exist_ok=True)
                mine.symlink_to(directory.resolve(), target_is_directory=True)
                log.info("adopted container %s from %s", vmid, directory)
            record["running"] = True
            return await self._ensure_running(vmid, record)

    async def _ensure_running(self, vmid: int, record: dict[str, Any]) -> Container:
        if await self._answers(record):
            return self._container(vmid, record)
        await self._kill(record, self._dir(vmid))
        port, ide_port, pid = await self._spawn(vmid, record)
        record.update(port=port, idePort=ide_port, pid=pid, running=True)
        self._write_record(vmid, record)
        return self._container(vmid, record)

    def _container(self, vmid: int, record: dict[str, Any]) -> Container:
        return Container(vmid=vmid, provider_ref=str(self._dir(vmid).resolve()), agent_host="127.0.0.1",
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
        if record.get("kind") == "dev" and self.ide_command:
            argv.append(f"--codeserver-command={self.ide_command}")

        def start() -> int:
            with open(log_path, "ab") as out:
                process = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                           start_new_session=True, cwd=directory)
            return process.pid

        try:
            pid = await trio.to_thread.run_sync(start)
        except OSError as exc:
            raise ProviderError(f"could not start agent for {vmid}: {exc}") from exc
        record.update(pid=pid, port=None, idePort=None)  # recorded before we wait on it
        self._write_record(vmid, record)
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

    async def _kill(self, record: dict[str, Any] | None, directory: Path | None = None) -> None:
        """Stop the container's agent: the recorded pid, and any process working in its directory
        (one spawned by a driver killed before it could record the pid)."""
        pids = set(_processes_in(directory)) if directory is not None else set()
        pid = record.get("pid") if record else None
        if pid:
            pids.add(int(pid))
        pids = {p for p in pids if process_alive(p)}
        if not pids:
            return
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        with trio.move_on_after(5):
            while any(process_alive(p) for p in pids):
                await trio.sleep(0.05)
        for pid in pids:
            if process_alive(pid):
                _signal(pid, signal.SIGKILL)

    async def _locate(self, vmid: int) -> dict[str, Any] | None:
        """The record of container `vmid`: this provider's own, or — when another replica made it —
        the one the database names (linked into this root, as `find` does). Call it under the lock."""
        record = self._record(vmid)
        if record is not None or self.recorded is None:
            return record
        ref = (await self.recorded()).get(vmid)
        if not ref:
            return None
        directory = Path(ref)
        try:
            record = json.loads((directory / "container.json").read_text())
        except (OSError, ValueError):
            return None
        if record.get("vmid") != vmid or directory.name != str(vmid):
            return None
        mine = self._dir(vmid)
        if mine.is_symlink():
            mine.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        mine.symlink_to(directory.resolve(), target_is_directory=True)
        log.info("adopted container %s from %s", vmid, directory)
        return record

    async def start(self, vmid: int) -> None:
        async with self._lock(vmid):
            record = await self._locate(vmid)
            if record is None:
                raise ProviderError(f"container {vmid} does not exist")
            record["running"] = True
            await self._ensure_running(vmid, record)

    async def stop(self, vmid: int) -> None:
        async with self._lock(vmid):
            record = await self._locate(vmid)
            if record is None:
                raise ProviderError(f"container {vmid} does not exist")
            await self._kill(record, self._dir(vmid))
            record["running"] = False
            self._write_record(vmid, record)

    async def status(self, vmid: int) -> str:
        async with self._lock(vmid):
            record = await self._locate(vmid)
        if record is None:
            return "missing"
        return "running" if record.get("pid") and process_alive(record["pid"]) else "stopped"

    async def destroy(self, vmid: int) -> None:
        async with self._lock(vmid):
            await self._locate(vmid)
            await self._remove(vmid)
        self._locks.pop(vmid, None)

    async def _remove(self, vmid: int) -> None:
        directory = self._dir(vmid)
        await self._kill(self._record(vmid), directory.resolve() if directory.exists() else None)
        real = directory.resolve()

        def remove() -> None:
            if directory.is_symlink():
                directory.unlink()
            shutil.rmtree(real, ignore_errors=True)

        await trio.to_thread.run_sync(remove)

    async def list_vmids(self) -> set[int]:
        if not self.root.exists():
            return set()
        return {int(p.name) for p in self.root.iterdir() if p.name.isdigit() and (p / "container.json").exists()}

    def _directories(self) -> set[int]:
        if not self.root.exists():
            return set()
        return {int(p.name) for p in self.root.iterdir() if p.name.isdigit()}

    async def current(self, vmid: int) -> Container | None:
        async with self._lock(vmid):
            record = await self._locate(vmid)
        return self._container(vmid, record) if record and record.get("port") else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reap agents whose directory is gone and the containers the database does not name,
        re-adopt agents that survived a restart, restart the ones that did not; on a clean exit stop
        them unless configured to keep them running (their records still say running, so the next
        start brings them back)."""
        for pid in await trio.to_thread.run_sync(self.orphaned_agents):
            log.warning("stopping agent %s: its container directory no longer exists", pid)
            await self._kill({"pid": pid})
        recorded = await self.recorded() if self.recorded is not None else None
        for vmid in sorted(self._directories()):
            directory = self._dir(vmid)
            if recorded is not None and recorded.get(vmid) != str(directory.resolve()):
                log.warning("reaping container %s: the database names no such container", vmid)
                async with self._lock(vmid):
                    if directory.is_symlink():
                        directory.unlink()  # the directory is another replica's; only the link is ours
                    else:
                        await self._remove(vmid)
                continue
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
                        await self._kill(self._record(vmid), self._dir(vmid).resolve())


    def orphaned_agents(self) -> list[int]:
        """Agent processes this provider started (by their command line: `-m bench.agent --data-dir
        <root>/<vmid>/data`) whose container directory no longer exists, e.g. after `rm -rf data`."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            words = [word.decode(errors="replace") for word in argv if word]
            if "bench.agent" not in words or "--data-dir" not in words[:-1]:
                continue
            data = Path(words[words.index("--data-dir") + 1])
            if data.parent.parent == self.root and data.name == "data" and not data.parent.exists():
                found.append(int(entry.name))
        return found


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


def _processes_in(directory: Path) -> list[int]:
    """Pids of the processes whose working directory is `directory` (agents run there)."""
    found = []
    target = str(directory.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "cwd") == target:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def process_alive(pid: int) -> bool:
    """Whether `pid` still runs. An exited process its parent has not reaped yet (a zombie) has not:
    a child of ours is reaped here; another's is told by its state in /proc."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


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
