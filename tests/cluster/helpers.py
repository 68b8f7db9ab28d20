"""What the scale-out tests run: gateway replicas as real processes on one PostgreSQL database, a
simulated fleet (in this process) that records which replica polled which agent, and a real agent.

Which replica made a request is read from the kernel: the agent side sees the peer port, and the
replica whose process holds the socket bound to that port (/proc/net/tcp inode → /proc/<pid>/fd) is
the one polling. No port is fixed: everything binds port 0."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.agent.config import FleetConfig
from bench.agent.http import Request, bound_port, open_listeners, serve_listeners
from bench.agent.simulator import Fleet, serve_simulated
from bench.harness import AgentRow, insert_instances
from bench.nginx import nginx_process, temp_paths
from bench.processes import Child, running
from storage.db import Store, connect_database

REPO = Path(__file__).resolve().parent.parent.parent
LISTENING = re.compile(r"ZLH gateway listening on (http://\S+)")
CORES = frozenset(os.sched_getaffinity(0))
PASSWORD = "cluster-password-1"
POLL_INTERVAL = 1.0
# The replicas run the default cluster settings (lease TTL 3 s, heartbeat 0.5 s: control/config.py);
# a kill's takeover must stay within half the documented 10 s bound.
TAKEOVER_BOUND = 5.0
SLOTS = 16


@dataclass
class Replica:
    name: str
    child: Child
    url: str

    @property
    def pid(self) -> int:
        return self.child.pid

    def kill(self) -> None:
        """kill -9: no resignation, no drain; its leases must lapse on their own."""
        os.kill(self.child.pid, signal.SIGKILL)


@dataclass
class Cluster:
    """Replicas sharing one database, started and stopped by `cluster()`."""

    database_url: str
    workdir: Path
    stack: AsyncExitStack
    jwt_secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    replicas: dict[str, Replica] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)

    def data_dir(self, name: str) -> Path:
        """Each replica's own data directory, as on separate machines: nothing is shared but the database."""
        return self.workdir / f"data-{name}"

    def env(self, name: str) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith("ZLH_") and k not in ("DATABASE_URL",)}
        return {**keep, "DATABASE_URL": self.database_url, "JWT_SECRET": self.jwt_secret,
                "ZLH_DATA_DIR": str(self.data_dir(name)), "ZLH_POLL_INTERVAL": str(POLL_INTERVAL),
                "ZLH_REPLICA_ID": name, "ZLH_CLUSTER_SLOTS": str(SLOTS),
                "ZLH_LOG_LEVEL": "WARNING",
                "ZLH_ARGON2_TIME_COST": "1", "ZLH_ARGON2_MEMORY_KIB": "64", "ZLH_ARGON2_PARALLELISM": "1",
                "ZLH_HYPERCORN_CONFIG": str(REPO / "hypercorn.toml"), **self.extra_env}

    async def start(self, *names: str, together: bool = False) -> list[Replica]:
        """Start replicas one after the other (the first migrates; the others find the schema ready),
        or all at the same instant (`together`), and wait until each listens."""
        started: list[Replica] = []

        async def one(name: str) -> None:
            argv = [sys.executable, "-m", "control", "run", "--port", "0"]
            child = await self.stack.enter_async_context(
                running(name, argv, cores=CORES, log_dir=self.workdir, env=self.env(name), cwd=REPO))
            url = await child.wait_for_line(lambda line: (m := LISTENING.search(line)) and m.group(1), 60)
            replica = Replica(name, child, str(url))
            self.replicas[name] = replica
            started.append(replica)

        if together:
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(one, name)
        else:
            for name in names:
                await one(name)
        return started

    def by_pid(self) -> dict[int, str]:
        return {r.pid: r.name for r in self.replicas.values()}


@asynccontextmanager
async def cluster(database_url: str, workdir: Path, **extra_env: str) -> AsyncIterator[Cluster]:
    async with AsyncExitStack() as stack:
        yield Cluster(database_url, workdir, stack, extra_env=dict(extra_env))


# --- which process holds a loopback socket ----------------------------------------------------

def _socket_inode(local_port: int, remote_port: int) -> str | None:
    want_local, want_remote = f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1] == want_local and parts[2] == want_remote:
            return parts[9]
    return None


def socket_owner(local_port: int, remote_port: int, pids: dict[int, str]) -> str:
    """The name of the process (among `pids`) holding 127.0.0.1:local_port → 127.0.0.1:remote_port."""
    inode = _socket_inode(local_port, remote_port)
    if inode is None:
        return "?"
    target = f"socket:[{inode}]"
    for pid, name in pids.items():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return name
                except OSError:
                    continue
        except OSError:
            continue
    return "?"


class RequestOrigins:
    """Which replica sent a request to a test agent listening on `agent_port` (see socket_owner),
    remembered per connection."""

    def __init__(self, replicas: Cluster) -> None:
        self.cluster = replicas
        self._owners: dict[int, tuple[Any, str]] = {}  # id(session) → (session, replica name)

    def of(self, request: Request, agent_port: int) -> str:
        session = request._session
        known = self._owners.get(id(session))
        if known is not None and known[0] is session:
            return known[1]
        peer_port = session.stream.socket.getpeername()[1]
        name = socket_owner(peer_port, agent_port, self.cluster.by_pid())
        if name != "?":
            self._owners[id(session)] = (session, name)
        return name


@dataclass
class Poll:
    agent: int
    at: float  # trio time
    replica: str


class RecordingFleet:
    """Simulated agents, a port each, recording every poll (`/ready`, which starts each one) with the
    replica that sent it."""

    def __init__(self, count: int, replicas: Cluster) -> None:
        self.fleet = Fleet(FleetConfig(count=count, ports_each=True))
        self.cluster = replicas
        self.polls: list[Poll] = []
        self._origins = RequestOrigins(replicas)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for agent in self.fleet.agents:
                listeners = await open_listeners("127.0.0.1", 0)
                port = bound_port(listeners)
                self.fleet.ports.append(port)

                async def handle(request: Request, agent: Any = agent, port: int = port) -> Any:
                    if request.path == "/ready":
                        self.polls.append(Poll(agent.index, trio.current_time(), self._origins.of(request, port)))
                    return await serve_simulated(agent, request, request.path)

                await nursery.start(serve_listeners, handle, listeners)
            task_status.started()

    def rows(self) -> list[AgentRow]:
        return [AgentRow("game", self.fleet.ports[i], self.fleet.secret(i)) for i in range(len(self.fleet.agents))]

    def since(self, moment: float) -> list[Poll]:
        return [p for p in self.polls if p.at >= moment]


# --- the Portal side ---------------------------------------------------------------------------

async def register(http: httpx.AsyncClient, url: str, email: str) -> dict[str, Any]:
    response = await http.post(f"{url}/api/auth/register", json={"email": email, "password": PASSWORD})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def bearer(session: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {session['accessToken']}"}


async def insert_agents(database_url: str, owner_id: int, rows: list[AgentRow], prefix: str) -> list[int]:
    """Instance rows in the `ready` state pointing at `rows` (the test plays the provisioner)."""
    store = Store(connect_database(database_url, max_connections=2), threads=1)
    try:
        return await store.run(insert_instances, owner_id, rows, prefix)
    finally:
        store.close()


async def storage(database_url: str, work: Any, *args: Any) -> Any:
    store = Store(connect_database(database_url, max_connections=2), threads=1)
    try:
        return await store.run(work, *args)
    finally:
        store.close()


@asynccontextmanager
async def real_agent(workdir: Path, *, log_interval: float = 0.05) -> AsyncIterator[dict[str, Any]]:
    """One reference agent process with its game server running and printing lines."""
    secret = secrets.token_urlsafe(24)
    secret_file = workdir / "agent.secret"
    secret_file.write_text(secret)
    argv = [sys.executable, "-m", "bench.agent", "--data-dir", str(workdir / "agent"), "--secret-file",
            str(secret_file), "--autostart", "--log-interval", str(log_interval)]
    async with running("agent", argv, cores=CORES, log_dir=workdir, cwd=REPO) as child:
        info = await child.wait_for_line(_json_with_port, 30)
        yield {"port": info["port"], "idePort": info.get("idePort"), "secret": secret}  # type: ignore[index]


def _json_with_port(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "port" in value else None


async def wait_until(predicate: Any, timeout: float, step: float = 0.1) -> float:
    """Poll `predicate()` (sync or async) until true; the seconds it took (AssertionError on timeout)."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return trio.current_time() - start
            await trio.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


# --- nginx in front of the replicas ------------------------------------------------------------

def nginx_config(prefix: Path, listen_port: int, replica_urls: list[str]) -> str:
    """What an operator runs in front of N replicas: round robin, a dead replica skipped after one
    failure, idempotent requests retried on the next replica, websocket upgrades passed."""
    servers = "".join(f"        server {u.removeprefix('http://')} max_fails=1 fail_timeout=10s;\n"
                      for u in replica_urls)
    return f"""{nginx_process(prefix, worker_connections=1024)}http {{
    access_log off;
{temp_paths(prefix)}    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    upstream zlh {{
{servers}        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{listen_port};
        location / {{
            proxy_pass http://zlh;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_next_upstream error timeout;
            proxy_connect_timeout 2s;
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


@asynccontextmanager
async def nginx_in_front(workdir: Path, replica_urls: list[str]) -> AsyncIterator[str]:
    from bench.nginx import free_port, nginx_binary

    binary = nginx_binary()
    assert binary is not None, "nginx is not installed (apt-get install -y nginx)"
    prefix = workdir / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(prefix, port, replica_urls))
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    async with running("nginx", argv, cores=CORES, log_dir=workdir) as child:

        async def listening() -> bool:
            assert child.process.poll() is None, child.tail()
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return False
            await stream.aclose()
            return True

        await wait_until(listening, 10, step=0.05)
        yield f"http://127.0.0.1:{port}"
