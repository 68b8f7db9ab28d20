"""The one ownership check. Every route that names a server goes through `owned_instance`: the owner
or an admin gets the instance; anyone else gets the same 404 as for a server that does not exist
(no hint that it exists)."""

from __future__ import annotations

from typing import Any

from gateway.agent_client import AgentTarget
from gateway.errors import ApiError
from storage import instances as store_instances

from .api import Ctx, CurrentUser


def may_access(user: CurrentUser, owner_id: int) -> bool:
    return user.is_admin or user.id == owner_id


async def owned_instance(ctx: Ctx, instance_id: int) -> Any:
    instance = await ctx.services.store.read(store_instances.get_instance, instance_id)
    if instance is None or not may_access(ctx.me, instance.owner_id):
        raise ApiError(404, "SERVER_NOT_FOUND", {"id": instance_id})
    return instance


def agent_target(instance: Any) -> AgentTarget:
    if not instance.agent_port or not instance.agent_secret:
        raise ApiError(409, "AGENT_NOT_CONFIGURED", {"state": instance.state})
    return AgentTarget(instance.agent_host, instance.agent_port, instance.agent_secret)
