"""Prometheus metrics of the gateway, on a registry of our own so tests and several apps in one
process do not collide: requests by route and status and their latency; the process itself (RSS,
open descriptors, CPU — what an operator watches on a streaming gateway) and the platform; the build;
the poller (poll duration, late and unreachable agents); open consoles, IDE websockets and streams;
and the fleet figures the control plane fills in at scrape time (edge outbox backlog, slot leases).

Gauges that are views of live state (late agents, open IDE websockets) are read when scraped
(`set_function`), never kept in step by hand."""

from __future__ import annotations

import platform
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

POLL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, version: str = "0.0.0") -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_open_fds, …
        PlatformCollector(registry=self.registry)  # python_info
        self.build = Info("zlh_build", "The running gateway's version", registry=self.registry)
        self.build.info({"version": version, "python": platform.python_version()})
        self.requests = Counter(
            "zlh_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "zlh_http_request_duration_seconds",
            "Time to answer (headers sent) per route",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.agents_polled = Counter("zlh_poller_polls", "Agent polls by outcome", ["outcome"], registry=self.registry)
        self.poll_lag = Gauge("zlh_poller_lag_seconds", "How late the last poll round started", registry=self.registry)
        self.poll_duration = Histogram("zlh_poller_poll_duration_seconds", "Time one agent poll took",
                                       buckets=POLL_BUCKETS, registry=self.registry)
        self.agents_late = Gauge("zlh_poller_agents_late",
                                 "Agents of this replica without a successful poll for 1.5 intervals",
                                 registry=self.registry)
        self.agents_unreachable = Gauge("zlh_poller_agents_unreachable",
                                        "Agents of this replica whose last poll failed", registry=self.registry)
        self.agents_polled_here = Gauge("zlh_poller_agents", "Agents this replica polls", registry=self.registry)
        self.open_consoles = Gauge("zlh_console_connections", "Open console websockets", registry=self.registry)
        self.ide_websockets = Gauge("zlh_ide_websockets", "Open IDE websockets", registry=self.registry)
        self.open_streams = Gauge("zlh_streams_open", "File and backup streams in flight", ["direction"],
                                  registry=self.registry)
        self.bytes_streamed = Counter(
            "zlh_stream_bytes", "Bytes forwarded by the data plane", ["direction"], registry=self.registry
        )
        self.outbox_pending = Gauge("zlh_edge_outbox_pending", "Edge-publishing changes not yet applied",
                                    registry=self.registry)
        self.outbox_failing = Gauge("zlh_edge_outbox_failing", "Pending edge changes that failed at least once",
                                    registry=self.registry)
        self.slots_held = Gauge("zlh_cluster_slots_held", "Poller slot leases this replica holds",
                                registry=self.registry)
        self.cluster_leader = Gauge("zlh_cluster_leader", "1 while this replica is the fleet leader",
                                    registry=self.registry)
        self.bytes_spliced = Counter(  # the part of zlh_stream_bytes that never entered Python (splice)
            "zlh_stream_spliced_bytes", "Bytes forwarded socket to socket by splice", ["direction"],
            registry=self.registry
        )

    def observe_request(self, route: str, method: str, status: int, duration: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(duration)

    def watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """`gauge` reads `read()` whenever it is scraped."""
        gauge.set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
