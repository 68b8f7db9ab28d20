"""The edge publisher chosen by configuration: `NoEdge` when nothing is configured (the embedded
default, which says so in its description), else the outbox publisher over the configured targets
(PowerDNS, Velocity; Prometheus service discovery needs no target, it reads published state)."""

from __future__ import annotations

from pathlib import Path

from storage.db import Store

from ..config import ConfigError, Settings
from . import EdgePublisher, NoEdge
from .dns import PowerDns
from .names import NamingPolicy
from .outbox import DnsTarget, EdgeTarget, Outbox, OutboxPublisher, VelocityTarget
from .velocity import VelocityConfig


def naming_policy(settings: Settings) -> NamingPolicy:
    return NamingPolicy(zone=settings.pdns_zone, domain=settings.public_domain or settings.pdns_zone,
                        address=settings.edge_public_ip, ide_domain=settings.ide_domain, ttl=settings.dns_ttl)


def edge_targets(settings: Settings, store: Store) -> list[EdgeTarget]:
    targets: list[EdgeTarget] = []
    if settings.pdns_api_url:
        if not (settings.pdns_zone and settings.pdns_api_key and settings.edge_public_ip):
            raise ConfigError("PDNS_API_URL needs PDNS_ZONE, PDNS_API_KEY and EDGE_PUBLIC_IP")
        dns = PowerDns(settings.pdns_api_url, settings.pdns_api_key, settings.pdns_zone,
                       server_id=settings.pdns_server_id, timeout=settings.edge_call_timeout)
        targets.append(DnsTarget(dns, naming_policy(settings)))
    if settings.velocity_config:
        config = VelocityConfig(Path(settings.velocity_config), settings.public_domain or settings.pdns_zone,
                                reload_command=settings.velocity_reload_command,
                                reload_url=settings.velocity_reload_url, timeout=settings.edge_call_timeout)
        targets.append(VelocityTarget(config, store))
    return targets


def edge_publisher(settings: Settings, store: Store) -> tuple[EdgePublisher, Outbox | None]:
    """The publisher, and the outbox worker to run as a background service (None for NoEdge)."""
    targets = edge_targets(settings, store)
    if not targets and not settings.prometheus_sd_token:
        return NoEdge(), None
    outbox = Outbox(store, targets, retry_base=settings.edge_retry_base, retry_max=settings.edge_retry_max,
                    call_timeout=settings.edge_call_timeout)
    notes = {"prometheusSd": bool(settings.prometheus_sd_token)}
    return OutboxPublisher(store, outbox, notes), outbox
