"""A fleet of simulated agents in one process, for load and failure tests of the gateway's poller.

Each simulated agent keeps its state in memory (no child process, no files) and serves the polling
and control subset of the agent contract: `/health`, `/ready`, `/status`, `/version`, `/update`,
`/players`, `/start`, `/stop`, `/restart`, `/console/command`. All agents share one port under
`/a/<i>/...`, or (`ports_each`) get a port each. Agent i's secret is `<secret_prefix><i>`. Faults
(see `faults.py`) are assigned at start and can be changed at runtime with `Fleet.set_fault`.

Thousands of agents are polled every few seconds on one core, so the request path must stay cheap:
a dict lookup for the route, lazily computed state (no timers, no task per agent), small JSON.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from bench.agent.config import FleetConfig
from bench.agent.faults import Fault, assign_faults, parse_fault, parse_rule
from bench.agent.fields import json_object, required
from bench.agent.http import (
    AbortConnection,
    ApiError,
    Request,
    Response,
    bound_port,
    json_response,
    open_listeners,
)
from bench.agent.small_http import SmallRequest, serve_small

GARBAGE = b'{"ready": tru\x00e, "state": '
SIMULATED_VERSION = "1.20.1"
LATEST_VERSION = "1.20.2"
# The simulator serves on the lean server; tests may drive the same handlers from the reference one.
SimRequest = Request | SmallRequest


@dataclass
class SimulatedAgent:
    index: int
    secret: str
    state: str
    players: list[str]
    start_seconds: float
    faults: list[Fault] = field(default_factory=list)
    version: str = SIMULATED_VERSION
    commands: int = 0
    flaps_since: float = 0.0  # trio time the flapping phases count from
    _settles_at: float = 0.0
    _settles_to: str = ""

    def current_state(self) -> str:
        if self._settles_to and trio.current_time() >= self._settles_at:
            self.state, self._settles_to = self._settles_to, ""
        return self.state

    def move(self, through: str, to: str) -> str:
        self.state = through
        self._settles_at = trio.current_time() + self.start_seconds
        self._settles_to = to
        return through

    def fault(self, kind: str) -> Fault | None:
        return next((fault for fault in self.faults if fault.kind == kind), None)

    def status(self) -> dict[str, object]:
        state = self.current_state()
        players = [{"name": name} for name in self.players] if state == "running" else []
        return {
            "state": state,
            "players": players,
            "playerCount": len(players),
            "version": self.version,
            "updateAvailable": self.version != LATEST_VERSION,
            "resources": {"cpuPercent": float(3 + self.index % 40) if state == "running" else 0.0,
                          "memoryBytes": (512 + self.index % 512) << 20 if state == "running" else 0,
                          "diskBytes": (100 + self.index % 900) << 20},
            "operations": [],
        }


SimulatedHandler = Callable[[SimulatedAgent, SimRequest], Awaitable[Response]]


async def health(agent: SimulatedAgent, request: SimRequest) -> Response:
    return json_response({"ok": True})


async def ready(agent: SimulatedAgent, request: SimRequest) -> Response:
    if agent.fault("notready"):
        return json_response({"ready": False, "state": "installing"})
    return json_response({"ready": True, "state": agent.current_state()})


async def status(agent: SimulatedAgent, request: SimRequest) -> Response:
    return json_response(agent.status())


async def version(agent: SimulatedAgent, request: SimRequest) -> Response:
    return json_response({"version": agent.version})


async def update_info(agent: SimulatedAgent, request: SimRequest) -> Response:
    return json_response({"updateAvailable": agent.version != LATEST_VERSION,
                          "current": agent.version, "latest": LATEST_VERSION})


async def apply_update(agent: SimulatedAgent, request: SimRequest) -> Response:
    state = agent.current_state()
    if state not in ("stopped", "crashed"):
        raise ApiError(409, "CONFLICT", {"reason": "stop the server first", "state": state})
    updated = agent.version != LATEST_VERSION
    agent.version = LATEST_VERSION
    return json_response({"updated": updated, "updateAvailable": False,
                          "current": agent.version, "latest": LATEST_VERSION})


async def players(agent: SimulatedAgent, request: SimRequest) -> Response:
    return json_response({"players": agent.status()["players"]})


def conflict(action: str, state: str) -> ApiError:
    return ApiError(409, "CONFLICT", {"reason": f"cannot {action} while {state}", "state": state})


async def start(agent: SimulatedAgent, request: SimRequest) -> Response:
    state = agent.current_state()
    if state not in ("stopped", "crashed"):
        raise conflict("start", state)
    return json_response({"state": agent.move("starting", "running")})


async def stop(agent: SimulatedAgent, request: SimRequest) -> Response:
    state = agent.current_state()
    if state not in ("starting", "running"):
        raise conflict("stop", state)
    return json_response({"state": agent.move("stopping", "stopped")})


async def restart(agent: SimulatedAgent, request: SimRequest) -> Response:
    state = agent.current_state()
    if state == "stopping":
        raise conflict("restart", state)
    return json_response({"state": agent.move("starting", "running")})


async def console_command(agent: SimulatedAgent, request: SimRequest) -> Response:
    command = required(await json_object(request), "command", str)
    state = agent.current_state()
    if not command.strip():
        raise ApiError(400, "BAD_REQUEST", {"field": "command", "reason": "empty"})
    if state not in ("starting", "running"):
        raise ApiError(409, "CONFLICT", {"reason": f"game server is {state}", "state": state})
    agent.commands += 1
    return json_response({"accepted": True})


SIMULATED_ROUTES: dict[tuple[str, str], SimulatedHandler] = {
    ("GET", "/health"): health,
    ("GET", "/ready"): ready,
    ("GET", "/status"): status,
    ("GET", "/version"): version,
    ("GET", "/update"): update_info,
    ("POST", "/update"): apply_update,
    ("GET", "/players"): players,
    ("POST", "/start"): start,
    ("POST", "/stop"): stop,
    ("POST", "/restart"): restart,
    ("POST", "/console/command"): console_command,
}
SIMULATED_PATHS = {path for _, path in SIMULATED_ROUTES}


async def serve_simulated(agent: SimulatedAgent, request: SimRequest, path: str) -> Response:
    """One request to one simulated agent: network faults, auth, then the route."""
    if agent.faults:
        flap = agent.fault("flap")
        if flap and int((trio.current_time() - agent.flaps_since) // flap.argument) % 2 == 1:
            raise AbortConnection()
        if agent.fault("reset"):
            raise AbortConnection()
        if agent.fault("hang"):
            await request.wait_for_disconnect()
        latency = agent.fault("latency")
        if latency:
            await trio.sleep(latency.argument)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), agent.secret):
        raise ApiError(401, "UNAUTHORIZED", None, [("www-authenticate", "Bearer")])
    if agent.fault("error500"):
        raise ApiError(500, "INTERNAL", {"reason": "injected fault"})
    if agent.fault("garbage"):
        return Response(200, [("content-type", "application/json")], GARBAGE)
    method = "GET" if request.method == "HEAD" else request.method
    handler = SIMULATED_ROUTES.get((method, path))
    if handler is None:
        if path in SIMULATED_PATHS:
            raise ApiError(405, "METHOD_NOT_ALLOWED", {"path": path})
        raise ApiError(404, "NOT_FOUND", {"path": path})
    return await handler(agent, request)


class Fleet:
    """The running fleet: addresses, secrets, and runtime fault control for tests."""

    def __init__(self, config: FleetConfig) -> None:
        self.host = config.host
        faults = assign_faults([parse_rule(rule) for rule in config.faults], config.count,
                               config.seed)
        self.agents = [
            SimulatedAgent(index, f"{config.secret_prefix}{index}", config.initial_state,
                           list(config.players), config.start_seconds, faults[index])
            for index in range(config.count)
        ]
        self.port = 0
        self.ports: list[int] = []

    def url(self, index: int) -> str:
        """The base URL of agent `index` (no trailing slash)."""
        if self.ports:
            return f"http://{self.host}:{self.ports[index]}"
        return f"http://{self.host}:{self.port}/a/{index}"

    def secret(self, index: int) -> str:
        return self.agents[index].secret

    def set_fault(self, index: int, fault: str | None) -> None:
        """Replace agent `index`'s faults by `fault` (a spec like "hang" or "latency:0.5"), or
        clear them with None."""
        self.agents[index].faults = [parse_fault(fault)] if fault else []

    def describe(self) -> dict[str, object]:
        return {"port": self.port, "ports": self.ports, "count": len(self.agents),
                "faulty": {str(agent.index): [str(f) for f in agent.faults]
                           for agent in self.agents if agent.faults}}

    async def serve_shared_port(self, request: SimRequest) -> Response:
        number, _, rest = request.path.removeprefix("/a/").partition("/")
        if not request.path.startswith("/a/") or not number.isdigit() \
                or int(number) >= len(self.agents):
            raise ApiError(404, "NOT_FOUND", {"path": request.path})
        return await serve_simulated(self.agents[int(number)], request, "/" + rest)


async def serve_fleet(
    config: FleetConfig, *, task_status: trio.TaskStatus[Fleet] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a simulated fleet until cancelled; `await nursery.start(serve_fleet, config)` gives
    the `Fleet`."""
    fleet = Fleet(config)
    for agent in fleet.agents:
        agent.flaps_since = trio.current_time()
    async with trio.open_nursery() as nursery:
        if config.ports_each:
            for agent in fleet.agents:
                listeners = await open_listeners(config.host, 0)
                fleet.ports.append(bound_port(listeners))
                await nursery.start(serve_small, one_agent_handler(agent), listeners)
        else:
            listeners = await open_listeners(config.host, config.port)
            fleet.port = bound_port(listeners)
            await nursery.start(serve_small, fleet.serve_shared_port, listeners)
        task_status.started(fleet)


def one_agent_handler(agent: SimulatedAgent) -> Callable[[SimRequest], Awaitable[Response]]:
    async def handle(request: SimRequest) -> Response:
        return await serve_simulated(agent, request, request.path)

    return handle
