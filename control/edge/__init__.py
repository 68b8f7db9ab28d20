"""Edge publishing: what the outside world learns once a server is ready (DNS, Velocity, Prometheus
service discovery, hosted IDE host names), and forgets when it is deleted.

The interface is EdgePublisher; provisioning calls `publish` only after semantic readiness and
delete calls `unpublish`. `NoEdge` is the embedded default: it publishes nothing external."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class PublishedInstance:
    instance_id: int
    vmid: int
    kind: str
    name: str
    engine_type: str
    agent_host: str
    agent_port: int
    allocated_ports: list[Any] = field(default_factory=list)
    payload: dict[str, Any] = field(default_factory=dict)


class EdgePublisher(Protocol):
    async def publish(self, instance: PublishedInstance) -> None: ...

    async def unpublish(self, instance: PublishedInstance) -> None: ...

    def describe(self) -> dict[str, Any]:
        """What this publisher does, for status pages."""


class NoEdge:
    """The embedded default: nothing is published outside this machine."""

    async def publish(self, instance: PublishedInstance) -> None:
        return None

    async def unpublish(self, instance: PublishedInstance) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"publisher": "none", "note": "embedded default: no DNS, Velocity or Prometheus publishing"}


class EdgeError(Exception):
    """A publishing target refused or could not be reached; the outbox retries the change later."""
