"""Provisioning and deletion of instances, driven by the transition table in control/lifecycle.py.

The Provisioner is a service in the app's nursery: POST /api/instances records the instance and hands
its id here; each provisioning runs as a task the Provisioner owns, step by step:
reserve → create the container → configure the agent → wait for *semantic* readiness → mark ready and
persist → publish edge routes. Any failure destroys what was created and leaves the instance failed
with a readable reason. Deleting an instance cancels its provisioning first.

One replica drives each provisioning: the one whose request recorded the instance (`driven_by`). At
start-up the Provisioner resumes the provisionings it may drive, and with several replicas it takes
over those whose replica died (control/cluster.py, OperationTakeover); every step is idempotent, so
a provisioning resumes from the step it reached.

Resume adopts. The container's identity (`provider_ref`, from the provider's `placement`) is recorded
before the provider makes anything, and its agent address before the agent is waited on; a driver
resuming `creating` first asks the provider for what the recorded identity names and adopts it, so a
takeover mid-create never makes a second container. Every such write is a compare-and-set on the
state and identity it read, and no replica writes an agent address from its own local memory: only
the address of the container the database names, right after this replica (re)started it."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from gateway.agent_client import AgentClient, AgentTarget, describe_failure, is_agent_ready_result
from gateway.errors import ApiError
from storage import instances as store_instances
from storage import operations as store_operations
from storage import users
from storage.clock import utcnow
from storage.db import Store

from .cluster import OperationTakeover
from .edge import EdgePublisher, PublishedInstance
from .lifecycle import PROVISIONING, InstanceState, is_provisioning, next_instance_state
from .providers.base import ContainerSpec, NotOurs, Provider, ProviderError

log = logging.getLogger("zlh.provisioning")


class Superseded(Exception):
    """The instance's state was moved by someone else (a delete, another replica) since it was read."""


class ProvisioningFailed(Exception):
    pass


def published(instance: Any) -> PublishedInstance:
    return PublishedInstance(
        instance_id=instance.id, vmid=instance.vmid, kind=instance.kind, name=instance.name,
        engine_type=instance.engine_type, agent_host=instance.agent_host or "",
        agent_port=instance.agent_port or 0, allocated_ports=list(instance.allocated_ports or []),
        payload=dict(instance.payload or {}),
    )


@dataclass
class Provisioner:
    store: Store
    provider: Provider
    edge: EdgePublisher
    agents: AgentClient
    takeover: OperationTakeover
    ready_timeout: float = 120.0
    ready_poll: float = 0.25
    _nursery: trio.Nursery | None = None
    _scopes: dict[int, trio.CancelScope] = field(default_factory=dict)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.provider.run)
            self._nursery = nursery
            claim = partial(store_operations.claim_provisionings, [s.value for s in PROVISIONING])
            await nursery.start(self.takeover.run, self.store, claim, self.submit)
            await self._record_restarted_agents()
            task_status.started()

    async def _record_restarted_agents(self) -> None:
        """The provider restarted, at start-up, agents of containers it holds that had died (new
        ports): record those addresses — only for the container the database names (the same
        `provider_ref`), compare-and-set on the address it replaces. A container the database does
        not name never changes a row (the provider reaps it)."""
        current = getattr(self.provider, "current", None)
        if current is None:
            return
        for instance in await self.store.run(store_instances.instances_in_states, [InstanceState.READY.value]):
            container = await current(instance.vmid)
            if (container is None or container.provider_ref != instance.provider_ref
                    or (container.agent_host, container.agent_port) == (instance.agent_host, instance.agent_port)):
                continue
            await self.store.run(partial(store_instances.record_made, instance.id, instance.state,
                                         instance.provider_ref, agent_host=container.agent_host,
                                         agent_port=container.agent_port, ide_port=container.ide_port))

    def submit(self, instance_id: int) -> None:
        assert self._nursery is not None, "Provisioner is not running"
        if instance_id in self._scopes:
            return
        scope = trio.CancelScope()
        self._scopes[instance_id] = scope
        self._nursery.start_soon(self._provision_task, instance_id, scope)

    def cancel(self, instance_id: int) -> None:
        scope = self._scopes.pop(instance_id, None)
        if scope is not None:
            scope.cancel()

    async def _provision_task(self, instance_id: int, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await self.provision(instance_id)
            except Superseded:
                log.info("provisioning of instance %s stopped: its state was moved elsewhere", instance_id)
            except Exception as exc:
                log.exception("provisioning %s crashed", instance_id)
                instance = await self.store.run(store_instances.get_instance, instance_id)
                if instance is not None and is_provisioning(instance.state):
                    await self._fail(instance, f"internal error: {type(exc).__name__}")
        if self._scopes.get(instance_id) is scope:
            del self._scopes[instance_id]

    async def _move(self, instance: Any, event: str, **fields: Any) -> Any:
        """One transition, compare-and-set on the state it was read in: never overwrite a move made
        meanwhile (a DELETING set by a request on another replica must not become READY here)."""
        state = next_instance_state(instance.state, event)
        if not await self.store.run(store_instances.move_instance, instance.id, instance.state,
                                    state=state.value, **fields):
            raise Superseded(instance.id)
        instance.state = state.value
        for key, value in fields.items():
            setattr(instance, key, value)
        return instance

    async def provision(self, instance_id: int) -> None:
        instance = await self.store.run(store_instances.get_instance, instance_id)
        if instance is None or not is_provisioning(instance.state):
            return
        try:
            if instance.state == InstanceState.RESERVED.value:
                instance = await self._move(instance, "create")
            if instance.state == InstanceState.CREATING.value:
                instance = await self._create_container(instance)
            if instance.state == InstanceState.CONFIGURING.value:
                instance = await self._configure_agent(instance)
            if instance.state == InstanceState.AWAITING_READY.value:
                await self._await_semantic_ready(instance)
                instance = await self._move(instance, "ready", ready_at=utcnow())
            if instance.state == InstanceState.PUBLISHING.value:
                await self.edge.publish(published(instance))
                instance = await self._move(instance, "published", state_reason=None)
                await self.store.run(users.audit, "instance.ready", instance.owner_id, f"instance:{instance.id}")
        except (ProvisioningFailed, ProviderError) as exc:
            await self._fail(instance, str(exc))

    async def _create_container(self, instance: Any) -> Any:
        payload = instance.payload or {}
        instance.vmid = await self.provider.claim_vmid(instance.id, instance.vmid)  # moves the row if it must
        spec = ContainerSpec(
            vmid=instance.vmid, kind=instance.kind, name=instance.name,
            hostname=f"{instance.kind}-{instance.vmid}", engine_type=instance.engine_type,
            cores=int(payload.get("cores", 1)), memory_mb=int(payload.get("memoryMb", 1024)),
            disk_gb=int(payload.get("diskGb", 8)), agent_secret=instance.agent_secret, payload=payload,
            instance_id=instance.id,
        )
        container = None
        if instance.provider_ref:  # a driver before this one got as far as making it: adopt that
            container = await self.provider.find(instance.vmid, instance.provider_ref, instance.agent_secret)
            if container is not None:
                log.info("provisioning of instance %s adopted container %s", instance.id, container.provider_ref)
        if container is None:
            await self._record(instance, provider_ref=self.provider.placement(spec))
            container = await self.provider.create(spec)
        if container.provider_ref != instance.provider_ref:
            await self._record(instance, provider_ref=container.provider_ref)
        return await self._move(instance, "created", agent_host=container.agent_host,
                                agent_port=container.agent_port, ide_port=container.ide_port)

    async def _record(self, instance: Any, **fields: Any) -> None:
        """Record what this step made before it continues, compare-and-set on the state and container
        identity read (another driver's record is never overwritten)."""
        if not await self.store.run(partial(store_instances.record_made, instance.id, instance.state,
                                            instance.provider_ref, **fields)):
            raise Superseded(instance.id)
        for key, value in fields.items():
            setattr(instance, key, value)

    async def _configure_agent(self, instance: Any) -> Any:
        """The agent must accept its secret (and only it) before we wait on it."""
        target = AgentTarget(instance.agent_host, instance.agent_port, instance.agent_secret)
        with trio.move_on_after(self.ready_timeout):
            while True:
                health = await self.agents.health(target)
                if health.status == 200:
                    return await self._move(instance, "configured")
                if health.status in (401, 403):
                    raise ProvisioningFailed("agent rejected its provisioning secret")
                await trio.sleep(self.ready_poll)
        raise ProvisioningFailed(f"agent never became reachable: {describe_failure(health)}")

    async def _await_semantic_ready(self, instance: Any) -> None:
        target = AgentTarget(instance.agent_host, instance.agent_port, instance.agent_secret)
        last = None
        with trio.move_on_after(self.ready_timeout):
            while True:
                last = await self.agents.get_agent_ready(target)
                if is_agent_ready_result(last):
                    return
                await trio.sleep(self.ready_poll)
        reason = describe_failure(last) if last is not None else "no answer"
        raise ProvisioningFailed(f"agent not ready after {self.ready_timeout:.0f}s ({reason})")

    async def _fail(self, instance: Any, reason: str) -> None:
        log.warning("provisioning of instance %s failed: %s", instance.id, reason)
        with trio.CancelScope(shield=True):
            try:
                await self.provider.destroy(instance.vmid)
            except ProviderError as exc:
                reason = f"{reason}; cleanup failed: {exc}"
            await self._move(instance, "fail", state_reason=reason)
            await self.store.run(users.audit, "instance.failed", instance.owner_id, f"instance:{instance.id}",
                                 reason=reason)

    async def delete(self, instance: Any, actor_id: int | None) -> Any:
        """Tear down everything an instance has: provisioning, edge routes, container, row
        (archived). Safe to repeat; a container already gone counts as destroyed."""
        self.cancel(instance.id)
        while instance.state != InstanceState.DELETING.value:
            try:
                await self._move(instance, "delete")
            except Superseded:  # moved meanwhile (a provisioning step elsewhere): read it again
                instance_id = instance.id
                instance = await self.store.run(store_instances.get_instance, instance_id)
                if instance is None:
                    raise ApiError(404, "SERVER_NOT_FOUND", {"id": instance_id}) from None
        with trio.CancelScope(shield=True):
            await self.edge.unpublish(published(instance))
            try:
                await self.provider.destroy(instance.vmid)
            except NotOurs as exc:  # the container there is not provably ours: left alone, the row kept
                await self.store.run(store_instances.update_instance, instance.id, state_reason=str(exc))
                raise ApiError(409, "CONTAINER_NOT_OURS", {"vmid": instance.vmid, "reason": str(exc)}) from None

            def archive() -> Any:
                record = store_instances.archive_and_delete(instance.id, "deleted")
                users.audit("instance.deleted", actor_id, f"instance:{instance.id}", vmid=instance.vmid)
                return record

            return await self.store.run(archive)

    async def remove_orphan_container(self, vmid: int, actor_id: int | None) -> Any:
        await self.provider.destroy(vmid)

        def archive() -> Any:
            record = store_instances.archive_orphan(vmid, "container without instance row")
            users.audit("container.orphan_removed", actor_id, f"vmid:{vmid}")
            return record

        return await self.store.run(archive)


def new_agent_secret() -> str:
    return secrets.token_urlsafe(32)
