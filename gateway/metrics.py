"""Prometheus metrics of the gateway (requests by route and status, latency), on a registry of our
own so tests and several apps in one process do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self.open_consoles = Gauge("zlh_console_connections", "Open console websockets", registry=self.registry)
        self.bytes_streamed = Counter(
            "zlh_stream_bytes", "Bytes forwarded by the data plane", ["direction"], registry=self.registry
        )
        self.bytes_spliced = Counter(  # the part of zlh_stream_bytes that never entered Python (splice)
            "zlh_stream_spliced_bytes", "Bytes forwarded socket to socket by splice", ["direction"],
            registry=self.registry
        )

    def observe_request(self, route: str, method: str, status: int, duration: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(duration)

    def render(self) -> bytes:
        return generate_latest(self.registry)
