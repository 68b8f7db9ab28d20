"""What the outside world calls a published instance: its game host name, its DNS records (A, plus
the `_minecraft._tcp` SRV for Minecraft; the IDE host name for dev containers) and its Velocity server
name. Pure functions of the instance and the configuration: nothing here does I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from . import PublishedInstance
from .dns import DnsRecord
from .ide_hosts import ide_hosts_for

MINECRAFT_ENGINES = {"minecraft", "vanilla", "paper", "purpur", "spigot", "bukkit", "fabric", "forge",
                     "neoforge", "quilt", "folia"}
MINECRAFT_PORT = 25565


@dataclass(frozen=True)
class NamingPolicy:
    zone: str  # the DNS zone we may write (games.example.com)
    domain: str  # game host names live under this (the zone or a name inside it)
    address: str  # what game and IDE host names resolve to
    ide_domain: str
    ttl: int = 60


def is_minecraft(engine_type: str) -> bool:
    engine = engine_type.strip().lower()
    return engine in MINECRAFT_ENGINES or engine.startswith("minecraft")


def host_label(instance: PublishedInstance) -> str:
    """A DNS label from the server's name, made unique by its VMID (`My Server!` → `my-server-105`)."""
    slug = re.sub(r"[^a-z0-9]+", "-", instance.name.lower()).strip("-")[:40].strip("-")
    return f"{slug or instance.kind}-{instance.vmid}"


def game_host(instance: PublishedInstance, domain: str) -> str:
    return f"{host_label(instance)}.{domain.strip('.').lower()}"


def velocity_server_name(instance: PublishedInstance) -> str:
    return f"zlh-{instance.vmid}"


def _port_of(entry: Any) -> int | None:
    if isinstance(entry, int):
        return entry
    if isinstance(entry, dict):
        for key in ("public", "external", "port"):
            if isinstance(entry.get(key), int):
                return int(entry[key])
    return None


def public_port(instance: PublishedInstance) -> int:
    """The port players connect to: the first allocated port, else Minecraft's default."""
    for entry in instance.allocated_ports:
        port = _port_of(entry)
        if port is not None:
            return port
    return MINECRAFT_PORT


def backend_port(instance: PublishedInstance) -> int:
    """The game's port inside its container (what Velocity forwards to)."""
    port = instance.payload.get("port")
    return port if isinstance(port, int) else MINECRAFT_PORT


def in_zone(name: str, zone: str) -> bool:
    zone = zone.strip(".").lower()
    return name == zone or name.endswith("." + zone)


def dns_records(instance: PublishedInstance, policy: NamingPolicy) -> list[DnsRecord]:
    """Every DNS record the instance gets (only names inside the zone: others are not ours to write)."""
    records: list[DnsRecord] = []
    if instance.kind == "game" and policy.domain:
        host = game_host(instance, policy.domain)
        records.append(DnsRecord(host, "A", policy.address, policy.ttl))
        if is_minecraft(instance.engine_type):
            content = f"0 5 {public_port(instance)} {host}."
            records.append(DnsRecord(f"_minecraft._tcp.{host}", "SRV", content, policy.ttl))
    for name in ide_hosts_for(instance, policy.ide_domain):
        records.append(DnsRecord(name, "A", policy.address, policy.ttl))
    return [r for r in records if in_zone(r.name, policy.zone)]
