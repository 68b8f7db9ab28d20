"""Every scenario of the bench suite, in the order a run goes through them; `--only` picks by name.

One line each says what it measures; the README's "Bench suite" section says how to read them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench.harness import Suite
from bench.results import ScenarioResult
from bench.scenarios.cluster_poller import cluster_poller
from bench.scenarios.poller_scale import poller_scale
from bench.scenarios.small_requests import (
    admin_listing_page,
    control_api_reads,
    ide_small_gets,
    ide_small_gets_keepalive,
)
from bench.scenarios.transfers import flat_memory, large_download, large_upload
from bench.scenarios.websockets import (
    console_round_trip,
    idle_consoles,
    websocket_bulk,
    websocket_echo,
)


@dataclass(frozen=True)
class Scenario:
    name: str
    measures: str
    run: Callable[[Suite], Awaitable[ScenarioResult]]


SCENARIOS = [
    Scenario("download", "large file download: MB/s per column, proxy peak RSS", large_download),
    Scenario("upload", "large file upload: MB/s per column, proxy peak RSS", large_upload),
    Scenario("flat_rss", "gateway peak RSS across transfer sizes (must stay flat)", flat_memory),
    Scenario("ide_gets", "small proxied GETs through /__ide/{id}/: req/s, p50/p99", ide_small_gets),
    Scenario("ide_gets_keepalive", "the same small GETs beside nginx with upstream keep-alive",
             ide_small_gets_keepalive),
    Scenario("console_rtt", "console command → game server → output line: p50/p99 µs", console_round_trip),
    Scenario("ws_echo", "websocket echo through the IDE path: p50/p99 µs, messages/s", websocket_echo),
    Scenario("ws_bulk", "bulk websocket echo throughput: MB/s", websocket_bulk),
    Scenario("api_reads", "GET /api/servers at N servers and GET /api/servers/:id: req/s, p50/p99",
             control_api_reads),
    Scenario("admin_page", "an admin's page of 100 from a 10,000-server listing: req/s, p50/p99", admin_listing_page),
    Scenario("idle_consoles", "proxy RSS with many idle console websockets", idle_consoles),
    Scenario("poller", "largest fleet polled on time; gateway CPU per 1,000 agents", poller_scale),
    Scenario("cluster_poller", "10,000 agents, 2 replicas on PostgreSQL: on time?; CPU and PostgreSQL "
             "load per replica", cluster_poller),
]
