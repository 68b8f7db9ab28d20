"""What every scenario does the same way: the per-column endpoints (direct, gateway, nginx), telling
a gateway route that does not exist yet from one that fails, reading the CPU of both cores around a
measurement, and the process whose memory a column is judged by.

It must never decide a skip on its own guess: a gateway column is skipped as "not available yet"
only when the gateway itself answered 404, 405 or 501 for the route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from bench.harness import Suite, route_missing_reason
from bench.loadgen import curl_status
from bench.results import ScenarioResult
from bench.system import core_busy, core_times, process_tree

MISSING_ROUTE_STATUSES = (404, 405, 501)
MB = 1e6
MiB = 1 << 20


@dataclass(frozen=True)
class Endpoint:
    """Where one column sends a request, and with which credentials."""

    column: str
    base: str
    headers: dict[str, str]


def agent_endpoints(suite: Suite, result: ScenarioResult) -> list[Endpoint]:
    """direct → the agent, gateway → the gateway, nginx → nginx (skipped when not installed).
    Paths differ per column, so the scenario builds the full URL; these carry base and credentials."""
    agent_auth = {"Authorization": f"Bearer {suite.agent.secret}"}
    endpoints = [Endpoint("direct", suite.agent.url, agent_auth),
                 Endpoint("gateway", suite.gateway.url, suite.session.headers)]
    if suite.nginx is not None:
        endpoints.append(Endpoint("nginx", suite.nginx.url, agent_auth))
    else:
        result.skip("nginx", suite.nginx_skip or "nginx is not running")
    return endpoints


async def gateway_route_skip(suite: Suite, method: str, url: str, headers: dict[str, str]) -> str | None:
    """The skip reason when the gateway does not serve `method url` yet, else None."""
    status = await curl_status(url, headers=headers, cores=suite.cores.load, method=method)
    if status in MISSING_ROUTE_STATUSES:
        return route_missing_reason(method, url.split("?")[0].replace(suite.gateway.url, ""), status)
    return None


def proxy_pids(suite: Suite, column: str) -> list[int]:
    """The processes whose CPU and memory a column is charged: the proxy, or the agent when direct."""
    if column == "gateway":
        return suite.gateway.pids()
    if column == "nginx" and suite.nginx is not None:
        return process_tree(suite.nginx.child.pid)
    return process_tree(suite.agent.child.pid)


@asynccontextmanager
async def cores_watched(result: ScenarioResult) -> AsyncIterator[None]:
    """Record how busy each core was over the block (the worst reading of the scenario is kept)."""
    before = core_times()
    try:
        yield
    finally:
        for core, share in core_busy(before, core_times()).items():
            result.core_busy[core] = max(share, result.core_busy.get(core, 0.0))


def human_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
