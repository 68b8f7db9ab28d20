"""The comparison harness: what every scenario runs against, started on loopback and stopped by the
suite. One reference agent (the "direct" column, pinned with the load generators), the gateway as
its own process (`python -m control run`, pinned to the proxy core, access log off), nginx in front
of the same agent when installed (pinned to the same proxy core), a registered user, and instance
rows that point the gateway at the agent.

Instance rows are written straight through storage/ functions (the bench is allowed to: it plays the
provisioner, so agents stay on the load cores instead of inheriting the gateway's core). It must never
leave a process running, and never reuse a database or data directory it did not create.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import peewee
import trio

from bench.nginx import (
    NginxUpstreams,
    RunningNginx,
    nginx_binary,
    running_nginx,
    running_small_answer,
)
from bench.processes import BenchError, Child, running
from bench.system import CorePlan, process_tree
from storage import instances as store_instances
from storage import users as store_users
from storage.clock import utcnow
from storage.db import Store, connect_database

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STORAGE_ATTEMPTS = 3
BENCH_PASSWORD = "bench-password-" + "x" * 8
LISTENING = re.compile(r"ZLH gateway listening on (http://\S+)")
T = TypeVar("T")


class RouteMissing(BenchError):
    """A gateway route the scenario needs answers 404/501: that column is skipped, not failed."""


def route_missing_reason(method: str, path: str, status: int) -> str:
    return f"gateway route not available yet ({method} {path} answered {status})"


@dataclass(frozen=True)
class RunConfig:
    quick: bool
    transfer_bytes: int
    flat_rss_sizes: tuple[int, ...]
    wrk_seconds: float
    wrk_connections: int
    round_trips: int
    round_trip_seconds: float
    console_commands: int
    ws_bulk_bytes: int
    api_servers: int
    admin_servers: int
    idle_consoles: int
    fleet_sizes: tuple[int, ...]
    cluster_fleet: int
    poll_interval: float
    poll_rounds: int
    nginx_keepalive: bool
    progress: Callable[[str], None]


@dataclass
class RunningAgent:
    child: Child
    url: str
    port: int
    ide_port: int
    secret: str
    data_dir: Path

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"


@dataclass
class RunningGateway:
    child: Child
    url: str
    data_dir: Path

    @property
    def database_url(self) -> str:
        return f"sqlite:///{(self.data_dir / 'zlh.db').resolve()}"

    def pids(self) -> list[int]:
        return process_tree(self.child.pid)

    async def storage(self, work: Callable[..., T], *args: Any) -> T:
        """Run one unit of storage work against this gateway's database, from the bench process."""
        store = Store(connect_database(self.database_url), threads=1)
        try:
            for attempt in range(STORAGE_ATTEMPTS):
                try:
                    return await store.run(work, *args)
                except peewee.OperationalError:
                    # SQLite "database is locked": the gateway held the write lock past busy_timeout.
                    if attempt == STORAGE_ATTEMPTS - 1:
                        raise
                    await trio.sleep(1.0)
            raise AssertionError("unreachable")
        finally:
            store.close()
            store.db.close()


@dataclass
class Session:
    """A logged-in bench user of one gateway."""

    user_id: int
    access_token: str
    issued: float = field(default_factory=time.monotonic)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


@dataclass(frozen=True)
class FastIde:
    """A dev server whose IDE port is the small-answer nginx (bench/nginx.py), for the small-GET bench."""

    upstream: RunningNginx
    server_id: int

    @property
    def port(self) -> int:
        return int(self.upstream.url.rsplit(":", 1)[1])


@dataclass
class Suite:
    """Everything a scenario may use; scenarios must not start long-lived processes of their own
    except through `running_*` below, inside their own `async with`."""

    config: RunConfig
    cores: CorePlan
    workdir: Path
    agent: RunningAgent
    gateway: RunningGateway
    session: Session
    game_server_id: int
    dev_server_id: int
    nginx: RunningNginx | None
    nginx_skip: str | None
    http: httpx.AsyncClient
    fast_ide: FastIde | None = None  # the IDE bench's fast upstream (None: nginx missing, the stand-in is used)

    def progress(self, text: str) -> None:
        self.config.progress(text)

    async def fresh_session(self) -> Session:
        """Log in again when the access token is older than 10 minutes (its TTL is 15)."""
        if time.monotonic() - self.session.issued > 600:
            self.session = await login(self.http, self.gateway.url, EMAIL)
        return self.session


EMAIL = "bench@example.com"
ADMIN_EMAIL = "bench-admin@example.com"


def agent_argv(data_dir: Path, secret: str) -> list[str]:
    return [sys.executable, "-m", "bench.agent", "--data-dir", str(data_dir), "--secret", secret,
            "--host", "127.0.0.1", "--port", "0", "--ide-port", "0", "--autostart",
            "--ide-autostart", "--log-interval", "0"]


def _announcement(line: str) -> dict[str, Any] | None:
    if not line.startswith("{") or '"port"' not in line:
        return None
    try:
        found: dict[str, Any] = json.loads(line)
    except ValueError:
        return None
    return found


@asynccontextmanager
async def running_agent(workdir: Path, cores: CorePlan, name: str = "agent") -> AsyncIterator[RunningAgent]:
    data_dir = workdir / name
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(24)
    async with running(name, agent_argv(data_dir, secret), cores=cores.load, log_dir=workdir,
                       cwd=REPO) as child:
        announced = await child.wait_for_line(_announcement, START_TIMEOUT)
        assert isinstance(announced, dict)
        port = int(announced["port"])
        agent = RunningAgent(child, f"http://127.0.0.1:{port}", port, int(announced["idePort"]),
                             secret, data_dir)
        await _wait_game_running(agent)
        yield agent


async def _wait_game_running(agent: RunningAgent) -> None:
    """The console scenarios need the game server up; /ready says so semantically."""
    async with httpx.AsyncClient(timeout=5) as http:
        with trio.move_on_after(START_TIMEOUT):
            while True:
                response = await http.get(f"{agent.url}/ready",
                                          headers={"Authorization": f"Bearer {agent.secret}"})
                if response.status_code == 200 and response.json().get("ready") is True:
                    return
                await trio.sleep(0.1)
    raise BenchError(f"the reference agent did not become ready:\n{agent.child.tail()}")


@dataclass(frozen=True)
class Fleet:
    child: Child
    ports: list[int]
    secret_prefix: str

    def rows(self) -> list[AgentRow]:
        """One instance row per simulated agent (agent i's secret is the prefix and i)."""
        return [AgentRow("game", port, f"{self.secret_prefix}{index}") for index, port in enumerate(self.ports)]


@asynccontextmanager
async def running_fleet(workdir: Path, cores: CorePlan, count: int, *,
                        name: str | None = None) -> AsyncIterator[Fleet]:
    prefix = f"sim-{secrets.token_hex(4)}-"
    argv = [sys.executable, "-m", "bench.agent", "--simulate", "--count", str(count), "--ports-each",
            "--secret-prefix", prefix, "--host", "127.0.0.1"]
    async with running(name or f"fleet-{count}", argv, cores=cores.load, log_dir=workdir, cwd=REPO) as child:
        announced = await child.wait_for_line(_announcement, START_TIMEOUT + count / 100)
        assert isinstance(announced, dict)
        ports = [int(p) for p in announced["ports"]]
        if len(ports) != count:
            raise BenchError(f"the simulator announced {len(ports)} ports for {count} agents")
        yield Fleet(child, ports, prefix)


def gateway_env(data_dir: Path, poll_interval: float) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith("ZLH_") and k not in ("DATABASE_URL", "JWT_SECRET")}
    return {**keep, "ZLH_DATA_DIR": str(data_dir), "ZLH_POLL_INTERVAL": str(poll_interval),
            "ZLH_LOG_LEVEL": "WARNING", "ZLH_HYPERCORN_CONFIG": str(REPO / "hypercorn.toml"),
            "JWT_SECRET": secrets.token_urlsafe(48)}


@asynccontextmanager
async def running_gateway(workdir: Path, cores: CorePlan, *, name: str = "gateway",
                          poll_interval: float = 5.0) -> AsyncIterator[RunningGateway]:
    data_dir = workdir / f"{name}-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "control", "run", "--port", "0"]
    async with running(name, argv, cores=cores.proxy, log_dir=workdir, cwd=REPO,
                       env=gateway_env(data_dir, poll_interval)) as child:
        url = await child.wait_for_line(lambda line: (m := LISTENING.search(line)) and m.group(1),
                                        START_TIMEOUT)
        yield RunningGateway(child, str(url), data_dir)


async def register(http: httpx.AsyncClient, base: str, email: str) -> Session:
    response = await http.post(f"{base}/api/auth/register", json={"email": email, "password": BENCH_PASSWORD})
    if response.status_code != 201:
        raise BenchError(f"register answered {response.status_code}: {response.text[:300]}")
    body = response.json()
    return Session(int(body["user"]["id"]), body["accessToken"])


async def login(http: httpx.AsyncClient, base: str, email: str) -> Session:
    response = await http.post(f"{base}/api/auth/login", json={"email": email, "password": BENCH_PASSWORD})
    if response.status_code != 200:
        raise BenchError(f"login answered {response.status_code}: {response.text[:300]}")
    body = response.json()
    return Session(int(body["user"]["id"]), body["accessToken"])


@dataclass(frozen=True)
class AgentRow:
    """One instance row to insert: which agent it points at."""

    kind: str
    port: int
    secret: str
    ide_port: int | None = None


def insert_instances(owner_id: int, rows: list[AgentRow], name_prefix: str) -> list[int]:
    """Instance rows in the `ready` state, as the provisioner leaves them (one transaction)."""
    first = store_instances.next_free_vmid()
    ids: list[int] = []
    now = utcnow()
    for offset, row in enumerate(rows):
        instance = store_instances.create_instance(
            vmid=first + offset, owner=owner_id, kind=row.kind, name=f"{name_prefix}-{offset}",
            engine_type="minecraft" if row.kind == "game" else "vscode", payload={},
            allocated_ports=[], provider="bench", agent_host="127.0.0.1", agent_port=row.port,
            agent_secret=row.secret, ide_port=row.ide_port, state="ready", ready_at=now)
        ids.append(int(instance.get_id()))
    return ids


def insert_listing_rows(owner_id: int, count: int) -> int:
    """`count` ready servers with no agent address (the poller skips them): rows for listing benches."""
    first = store_instances.next_free_vmid()
    now = utcnow()
    for offset in range(count):
        store_instances.create_instance(
            vmid=first + offset, owner=owner_id, kind="game", name=f"listing-{offset}", engine_type="minecraft",
            payload={}, allocated_ports=[], provider="bench", state="ready", ready_at=now)
    return count


async def admin_session(http: httpx.AsyncClient, gateway: RunningGateway) -> Session:
    """A second bench user with the admin role (the bench user itself stays a plain user)."""
    await register(http, gateway.url, ADMIN_EMAIL)
    plain = await login(http, gateway.url, ADMIN_EMAIL)
    await gateway.storage(store_users.set_role, plain.user_id, "admin")
    return await login(http, gateway.url, ADMIN_EMAIL)


async def wait_agent_ready(http: httpx.AsyncClient, gateway: RunningGateway, session: Session,
                           server_id: int, timeout: float) -> None:
    """Until the gateway's poller has seen the agent ready (data-plane routes may require it)."""
    with trio.move_on_after(timeout):
        while True:
            response = await http.get(f"{gateway.url}/api/servers/{server_id}", headers=session.headers)
            if response.status_code == 200 and response.json().get("agentReady"):
                return
            await trio.sleep(0.2)


@asynccontextmanager
async def open_suite(config: RunConfig, cores: CorePlan, workdir: Path) -> AsyncIterator[Suite]:
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
        config.progress("starting the reference agent (load cores)")
        agent = await stack.enter_async_context(running_agent(workdir, cores))
        config.progress("starting the gateway (proxy core)")
        gateway = await stack.enter_async_context(
            running_gateway(workdir, cores, poll_interval=config.poll_interval))
        session = await register(http, gateway.url, EMAIL)
        small_answer: RunningNginx | None = None
        if nginx_binary() is not None:
            config.progress("starting the small-answer IDE upstream (nginx, load cores)")
            small_answer = await stack.enter_async_context(running_small_answer(
                workdir, cores=cores.load, log_dir=workdir))
        rows = [AgentRow("game", agent.port, agent.secret, agent.ide_port),
                AgentRow("dev", agent.port, agent.secret, agent.ide_port)]
        if small_answer is not None:
            rows.append(AgentRow("dev", agent.port, agent.secret, int(small_answer.url.rsplit(":", 1)[1])))
        game_id, dev_id, *fast_id = await gateway.storage(insert_instances, session.user_id, rows, "bench")
        fast_ide = FastIde(small_answer, fast_id[0]) if small_answer is not None else None
        await wait_agent_ready(http, gateway, session, game_id, timeout=2 * config.poll_interval + 5)
        nginx: RunningNginx | None = None
        nginx_skip: str | None = None
        if nginx_binary() is None:
            nginx_skip = "nginx is not installed (apt-get install -y nginx, or `make bench`)"
            config.progress(f"nginx column skipped: {nginx_skip}")
        else:
            config.progress("starting nginx (proxy core)")
            nginx = await stack.enter_async_context(running_nginx(
                workdir, nginx_upstreams(agent, config.nginx_keepalive, fast_ide), cores=cores.proxy, log_dir=workdir))
        yield Suite(config, cores, workdir, agent, gateway, session, game_id, dev_id, nginx,
                    nginx_skip, http, fast_ide)


def nginx_upstreams(agent: RunningAgent, keepalive: bool, fast_ide: FastIde | None) -> NginxUpstreams:
    return NginxUpstreams(agent.port, agent.ide_port, keepalive, fast_ide.port if fast_ide is not None else None)
