"""The gateway as its own process (`python -m control run`), the way an operator runs it, and the
operator CLI run against it: what tests/control/test_cli*.py drive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.conftest import TEST_SECRET

ROOT = Path(__file__).resolve().parents[2]


def process_env(data_dir: Path, database_url: str, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "ZLH_DATA_DIR": str(data_dir),
            "DATABASE_URL": database_url, "JWT_SECRET": TEST_SECRET,
            "ZLH_ARGON2_TIME_COST": "1", "ZLH_ARGON2_MEMORY_KIB": "64", "ZLH_ARGON2_PARALLELISM": "1",
            "ZLH_POLL_INTERVAL": "0.5", "ZLH_DEMO": "0", "ZLH_LOG_LEVEL": "WARNING", **extra}


@dataclass
class GatewayProcess:
    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    log: Path = field(default_factory=Path)

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.log = self.data_dir.parent / f"gateway-{len(list(self.data_dir.parent.glob('gateway-*.log')))}.log"
        with open(self.log, "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "control", "run", "--port", "0"], env=self.env,
                                    cwd=self.data_dir.parent, stdout=out, stderr=subprocess.STDOUT)

    async def start(self, timeout: float = 60) -> None:
        self.process = await trio.to_thread.run_sync(self._spawn)
        with trio.fail_after(timeout):
            while True:
                for path in (self.data_dir / "run").glob("*.json") if (self.data_dir / "run").is_dir() else []:
                    record = json.loads(path.read_text())
                    if record["pid"] == self.process.pid:
                        self.url = record["binds"][0]
                        return
                assert self.process.poll() is None, f"gateway exited: {self.log.read_text()[-3000:]}"
                await trio.sleep(0.1)

    async def wait_exit(self, timeout: float = 60) -> int:
        assert self.process is not None
        with trio.fail_after(timeout):
            while self.process.poll() is None:
                await trio.sleep(0.05)
        return self.process.returncode

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        """Stop at once, no clean shutdown (its agents keep running, as after a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def stop(self) -> None:
        """Teardown: a clean shutdown, then whatever agent of this data dir is still running (one whose
        record a test removed) is stopped by its pid, so no test leaves a process behind."""
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGTERM)
            with trio.move_on_after(40):
                await self.wait_exit()
        self.kill()
        for pid in processes_under(self.data_dir):
            try:
                os.killpg(pid, signal.SIGKILL)  # an agent leads its own session (its game server too)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    async def cli(self, *args: str, expect: int = 0) -> Any:
        """`python -m control <args> --json` against this gateway's settings; its parsed output."""
        done = await trio.run_process([sys.executable, "-m", "control", *args, "--json"], env=self.env,
                                      cwd=self.data_dir.parent, capture_stdout=True, capture_stderr=True,
                                      check=False)
        assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
        return json.loads(done.stdout) if done.stdout.strip() else None


class Api:
    """A registered user's view of the gateway over HTTP."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.headers: dict[str, str] = {}

    async def register(self, email: str = "op@example.com") -> None:
        response = await self.client.post("/api/auth/register", json={"email": email, "password": "password123"})
        assert response.status_code == 201, response.text
        self.headers = {"authorization": f"Bearer {response.json()['accessToken']}"}

    async def provision(self, kind: str = "game", name: str = "srv", timeout: float = 60) -> dict[str, Any]:
        response = await self.client.post("/api/instances", headers=self.headers, json={
            "kind": kind, "name": name, "engineType": "minecraft" if kind == "game" else "vscode", "payload": {}})
        assert response.status_code == 202, response.text
        instance: dict[str, Any] = response.json()
        with trio.fail_after(timeout):
            while True:
                state = (await self.client.get(f"/api/servers/{instance['id']}", headers=self.headers)).json()
                if state.get("instanceState") == "ready" and state.get("agentReady"):
                    return instance
                await trio.sleep(0.2)


def sparse_file(path: Path, size: int) -> None:
    """A file of `size` bytes that takes no disk (the agent streams it as zeros)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)


def agent_record(data_dir: Path, vmid: int) -> dict[str, Any]:
    return json.loads((data_dir / "containers" / str(vmid) / "container.json").read_text())  # type: ignore[no-any-return]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def processes_under(directory: Path) -> list[int]:
    """Pids whose command line names `directory` (agents of that data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(directory).encode() in (entry / "cmdline").read_bytes() and alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


