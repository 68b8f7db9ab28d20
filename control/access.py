"""The one access rule, ownership half. Every request is first authenticated once
(control/api.py::authenticate for bearer access tokens; the console and the IDE proxy verify their own
token kind and then ask the same session rule, control/sessions.py: account active, login not ended).
Then every object a user can name is checked here, by `grant`: its owner or an admin gets it; anyone
else gets the same 404 the API gives for an object that does not exist (no hint that it exists).

Never decide ownership anywhere else: a route that names a server, container, environment or job
calls `grant` (directly, or through `owned` / `owned_instance`)."""

from __future__ import annotations

from typing import Any, TypeVar

from gateway.agent_client import AgentTarget
from gateway.errors import ApiError
from storage import instances as store_instances

from .api import Ctx, CurrentUser

Owned = TypeVar("Owned")


def may_access(user: CurrentUser, owner_id: int) -> bool:
    return user.is_admin or user.id == owner_id


def listing_owner(user: CurrentUser) -> int | None:
    """Whose objects a listing shows `user`: their own, or (None) everyone's for an admin."""
    return None if user.is_admin else user.id


def grant(user: CurrentUser, owner_id: int | None, missing: ApiError) -> None:
    """Allow `user` an object owned by `owner_id` (None: there is no such object); raise `missing`,
    the object family's own "not found", otherwise."""
    if owner_id is None or not may_access(user, owner_id):
        raise missing


def owned(user: CurrentUser, found: Owned | None, missing: ApiError) -> Owned:
    """`found` (a row with an `owner_id`, or None when there is none) if `grant` allows it to `user`."""
    grant(user, found.owner_id if found is not None else None, missing)  # type: ignore[attr-defined]
    assert found is not None
    return found


def server_not_found(instance_id: int) -> ApiError:
    return ApiError(404, "SERVER_NOT_FOUND", {"id": instance_id})


async def owned_instance(ctx: Ctx, instance_id: int) -> Any:
    instance = await ctx.services.store.read(store_instances.get_instance, instance_id)
    return owned(ctx.me, instance, server_not_found(instance_id))


def agent_target(instance: Any) -> AgentTarget:
    if not instance.agent_port or not instance.agent_secret:
        raise ApiError(409, "AGENT_NOT_CONFIGURED", {"state": instance.state})
    return AgentTarget(instance.agent_host, instance.agent_port, instance.agent_secret)
