"""Instances: `GET /api/instances` (ContainerInstance rows, owner-scoped, admins see all),
`POST /api/instances` (validate, check plan limits, record, hand to the Provisioner, answer 202), and
`DELETE /api/containers/:vmid` (cleanup / delete / orphan remediation, idempotent)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic

from gateway.errors import ApiError
from storage import instances as store_instances
from storage import users
from storage.clock import isoformat

from .access import grant, listing_owner
from .api import Body, Ctx
from .lifecycle import InstanceState
from .provisioning import Provisioner, new_agent_secret
from .services import Services

Name = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]*$")]
EngineType = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")]


class InstancePayload(pydantic.BaseModel):
    """Known payload fields are checked; other engine-specific fields pass through to the agent."""

    model_config = pydantic.ConfigDict(extra="allow", strict=True)
    cores: int = pydantic.Field(default=1, ge=1, le=64)
    memory_mb: int = pydantic.Field(default=1024, ge=256, le=262144, alias="memoryMb")
    disk_gb: int = pydantic.Field(default=8, ge=1, le=4096, alias="diskGb")
    ports: list[Annotated[int, pydantic.Field(ge=1, le=65535)]] = pydantic.Field(default_factory=list, max_length=16)


class CreateInstance(Body):
    kind: Literal["game", "dev"]
    name: Name
    engine_type: EngineType = pydantic.Field(alias="engineType")
    payload: InstancePayload = pydantic.Field(default_factory=InstancePayload)


INSTANCE_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "id": {"type": "integer"}, "vmid": {"type": "integer"}, "kind": {"enum": ["game", "dev"]},
    "name": {"type": "string"}, "engineType": {"type": "string"}, "payload": {"type": "object"},
    "allocatedPorts": {"type": "array"}, "state": {"type": "string"}, "stateReason": {"type": ["string", "null"]},
    "ownerId": {"type": "integer"}, "createdAt": {"type": "string"}, "updatedAt": {"type": "string"},
    "readyAt": {"type": ["string", "null"]}}}


def instance_json(instance: Any) -> dict[str, Any]:
    return {
        "id": instance.id, "vmid": instance.vmid, "kind": instance.kind, "name": instance.name,
        "engineType": instance.engine_type, "payload": instance.payload or {},
        "allocatedPorts": instance.allocated_ports or [], "state": instance.state,
        "stateReason": instance.state_reason, "ownerId": instance.owner_id,
        "createdAt": isoformat(instance.created_at), "updatedAt": isoformat(instance.updated_at),
        "readyAt": isoformat(instance.ready_at),
    }


def archive_json(record: Any) -> dict[str, Any]:
    return {"vmid": record.vmid, "kind": record.kind, "name": record.name, "engineType": record.engine_type,
            "payload": record.payload, "allocatedPorts": record.allocated_ports, "finalState": record.final_state,
            "deletedAt": isoformat(record.deleted_at)}


def provisioner(ctx: Ctx) -> Provisioner:
    return ctx.services.provisioner


async def list_instances(ctx: Ctx) -> list[dict[str, Any]]:
    rows = await ctx.services.store.run(store_instances.list_instances, listing_owner(ctx.me))
    return [instance_json(row) for row in rows]


def check_plan_limits(user: Any, plan: Any, body: CreateInstance, counts: dict[str, int]) -> None:
    """Raise 403 PLAN_LIMIT naming the limit the request would break. Admins are exempt."""
    if user.role == "admin":
        return
    if plan is None:
        raise ApiError(403, "PLAN_LIMIT", {"limit": "plan", "reason": f"unknown plan {user.plan!r}"})
    limit_name = "max_game_servers" if body.kind == "game" else "max_dev_servers"
    allowed = getattr(plan, limit_name)
    if counts[body.kind] >= allowed:
        raise ApiError(403, "PLAN_LIMIT", {"limit": limit_name, "allowed": allowed, "current": counts[body.kind],
                                           "plan": plan.name})
    payload = body.payload
    for field_name, value, cap in (("cores", payload.cores, plan.max_cpu_cores),
                                   ("memoryMb", payload.memory_mb, plan.max_memory_mb),
                                   ("diskGb", payload.disk_gb, plan.max_disk_gb)):
        if value > cap:
            raise ApiError(403, "PLAN_LIMIT", {"limit": field_name, "allowed": cap, "requested": value,
                                               "plan": plan.name})


async def create_instance(ctx: Ctx) -> tuple[dict[str, Any], int]:
    instance = await provision_instance(ctx.services, ctx.me.id, ctx.body)
    return instance_json(instance), 202


async def provision_instance(services: Services, user_id: int, body: CreateInstance) -> Any:
    """Check the plan, record the instance (reserved) and hand it to the Provisioner."""
    payload = body.payload.model_dump(by_alias=True)
    secret = new_agent_secret()

    def record() -> Any:
        user = users.user_by_id(user_id)
        if user is None or users.account_state(user) != "active":  # changed since authentication
            raise ApiError(401, "UNAUTHORIZED")
        plan = users.plan_by_name(user.plan)
        counts = {kind: store_instances.count_by_kind(user.id, kind) for kind in ("game", "dev")}
        check_plan_limits(user, plan, body, counts)
        for _attempt in range(5):
            try:
                instance = store_instances.create_instance(
                    vmid=store_instances.next_free_vmid(), owner=user.id, kind=body.kind, name=body.name,
                    engine_type=body.engine_type, payload=payload, allocated_ports=list(body.payload.ports),
                    provider=services.settings.provider, agent_secret=secret, state=InstanceState.RESERVED.value,
                    driven_by=services.settings.replica_id,  # this replica provisions it (submit below)
                )
                break
            except store_instances.VmidTaken:
                continue
        else:
            raise ApiError(409, "VMID_CONFLICT")
        users.audit("instance.create", user.id, f"instance:{instance.id}", kind=body.kind)
        return instance

    instance = await services.store.run(record)
    services.provisioner.submit(instance.id)
    return instance


async def delete_container(ctx: Ctx, vmid: int) -> dict[str, Any]:
    instance = await ctx.services.store.run(store_instances.instance_by_vmid, vmid)
    if instance is not None:
        grant(ctx.me, instance.owner_id, ApiError(404, "CONTAINER_NOT_FOUND", {"vmid": vmid}))
        record = await provisioner(ctx).delete(instance, ctx.me.id)
        return {"deleted": True, "vmid": vmid, "archive": archive_json(record) if record else None}
    # A container without a row: only an admin may remove what nobody owns.
    if ctx.me.is_admin and vmid in await provisioner(ctx).provider.list_vmids():
        record = await provisioner(ctx).remove_orphan_container(vmid, ctx.me.id)
        return {"deleted": True, "vmid": vmid, "orphan": True, "archive": archive_json(record)}
    raise ApiError(404, "CONTAINER_NOT_FOUND", {"vmid": vmid})
