"""The provider interface: what provisioning needs from wherever containers live.

Every method is idempotent for a VMID: creating a container that already exists returns it,
destroying one that is gone succeeds. Providers raise ProviderError with a readable reason.

Resume adopts: `placement(spec)` names the container `create(spec)` will make before anything is made,
so the provisioner records it first; a replica resuming a provisioning its dead driver left calls
`find` on that record and adopts what is there instead of making a second container."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class ProviderError(Exception):
    pass


class NotOurs(ProviderError):
    """The provider cannot prove it created the container at a VMID, so it refused and did nothing."""


@dataclass(frozen=True)
class ContainerSpec:
    vmid: int
    kind: str  # game | dev
    name: str
    hostname: str
    engine_type: str
    cores: int
    memory_mb: int
    disk_gb: int
    agent_secret: str
    payload: dict[str, Any] = field(default_factory=dict)
    instance_id: int = 0  # the instance this container is for (the Proxmox ownership marker names it)


@dataclass(frozen=True)
class Container:
    vmid: int
    provider_ref: str
    agent_host: str
    agent_port: int
    ide_port: int | None = None


class Provider(Protocol):
    name: str

    def placement(self, spec: ContainerSpec) -> str:
        """The `provider_ref` of the container `create(spec)` makes, known before it is made."""

    async def claim_vmid(self, instance_id: int, vmid: int) -> int:
        """The VMID the instance's container is made at: `vmid` when the provider can use it, else
        another it has reserved and moved the instance row to (the same on every retry)."""

    async def create(self, spec: ContainerSpec) -> Container:
        """Create and boot the container with its agent configured with `spec.agent_secret`."""

    async def find(self, vmid: int, provider_ref: str, agent_secret: str) -> Container | None:
        """The container `provider_ref` names if it exists and was made for this instance (it holds
        `agent_secret`): adopted, running, with its agent's address. None when nothing was made there."""

    async def start(self, vmid: int) -> None: ...

    async def stop(self, vmid: int) -> None: ...

    async def status(self, vmid: int) -> str:
        """`running`, `stopped` or `missing`."""

    async def destroy(self, vmid: int) -> None: ...

    async def list_vmids(self) -> set[int]:
        """Every container this provider holds (for orphan remediation)."""

    async def run(self, *, task_status: Any) -> None:
        """The provider's own background work (supervision, re-adoption), in the app's nursery."""
