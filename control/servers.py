"""Servers (game and dev runtime): normalized state read from storage — never a live agent call per
Portal request — and the control actions forwarded to the agent: start/stop/restart (one power action
at a time per server) and console commands."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any

import orjson
import pydantic

from gateway.agent_client import forward_agent_result
from gateway.errors import ApiError
from storage import billing as store_billing
from storage import instances as store_instances
from storage import users
from storage.clock import isoformat, utcnow

from .access import agent_target, owned_instance
from .api import Body, Ctx
from .lifecycle import InstanceState
from .services import Services

POWER_HOLD_SECONDS = 60
STALE_AFTER_INTERVALS = 3
MAX_PAGE_SIZE = 500


class ConsoleCommand(Body):
    command: Annotated[str, pydantic.StringConstraints(min_length=1, max_length=1000)]


SERVER_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "id": {"type": "integer"}, "vmid": {"type": "integer"}, "kind": {"type": "string"}, "name": {"type": "string"},
    "state": {"type": "string"}, "agentReady": {"type": "boolean"},
    "agent": {"type": "object", "properties": {"alive": {"type": "boolean"}, "ready": {"type": "boolean"},
                                               "lastSeenAt": {"type": ["string", "null"]},
                                               "lastError": {"type": ["string", "null"]}}},
    "players": {"type": "array"}, "version": {"type": ["string", "null"]}, "updateAvailable": {"type": "boolean"},
    "operations": {"type": "array"}}}


SERVER_PAGE_SCHEMA: dict[str, Any] = {"type": "object", "required": ["items", "next"], "properties": {
    "items": {"type": "array", "items": SERVER_SCHEMA},
    "next": {"type": ["integer", "null"], "description": "pass as `after` for the next page; null on the last"}}}
LIST_DOC: dict[str, Any] = {
    "description": "Without `pageSize` or `after` the answer is the plain array of every server (what the Portal "
                   "reads). With either, one page in id order: `{items, next}`; pass `next` back as `after` for the "
                   "following page (keyset pagination: stable while servers are added or removed).",
    "parameters": [
        {"name": "pageSize", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": 100}},
        {"name": "after", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0},
         "description": "the `next` of the previous page: servers with a larger id"}],
    "responses": {"200": {"description": "the servers (a plain array) or one page of them",
                          "content": {"application/json": {"schema": {"oneOf": [
                              {"type": "array", "items": SERVER_SCHEMA}, SERVER_PAGE_SCHEMA]}}}}},
}


READY = InstanceState.READY.value  # read once: an Enum member's .value is a property lookup per row


@lru_cache(maxsize=8)
def _stale_after(poll_interval: float) -> timedelta:
    return timedelta(seconds=poll_interval * STALE_AFTER_INTERVALS)


def _embedded(text: str | None, empty: Any) -> Any:
    """A JSON column as stored, embedded in the answer as is (orjson.Fragment): never decoded here."""
    return orjson.Fragment(text) if text else empty


def normalized_state(instance: Any, agent: Any, poll_interval: float, now: datetime | None = None) -> dict[str, Any]:
    """The Portal's view of one server (instance and agent as `store_instances.portal_rows` reads them).
    `agentReady` is the last semantic /ready, and it reads as false once that answer is older than a few
    poll intervals. A listing passes one `now` for all its rows."""
    now = utcnow() if now is None else now
    fresh = (agent is not None and agent.ready_checked_at is not None
             and now - agent.ready_checked_at <= _stale_after(poll_interval))
    alive = bool(agent and agent.alive and fresh)
    ready = bool(agent and agent.ready and fresh)
    if instance.state == READY:
        state = (agent.server_state if agent and alive and agent.server_state else
                 "unreachable" if agent and agent.polled_at else "unknown")
    else:
        state = instance.state
    return {
        "id": instance.id, "vmid": instance.vmid, "kind": instance.kind, "name": instance.name,
        "engineType": instance.engine_type, "instanceState": instance.state, "stateReason": instance.state_reason,
        "state": state, "agentReady": ready,
        "agent": {"alive": alive, "ready": ready, "lastSeenAt": isoformat(agent.last_seen_at) if agent else None,
                  "lastError": agent.last_error if agent else None},
        "players": _embedded(agent.players if agent else None, []),
        "version": agent.version if agent else None,
        "updateAvailable": bool(agent and agent.update_available),
        "operations": _embedded(agent.operations if agent else None, []),
        "resources": _embedded(agent.resources if agent else None, None),
        "allocatedPorts": _embedded(instance.allocated_ports, []),
    }


def _query_int(ctx: Ctx, name: str, low: int, high: int | None) -> int | None:
    raw = ctx.query.get(name)
    if raw is None:
        return None
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 18 else None
    if value is None or value < low or (high is not None and value > high):
        bound = f"an integer from {low}" + (f" to {high}" if high is not None else "")
        raise ApiError(400, "VALIDATION_FAILED", [{"field": name, "message": f"must be {bound}"}])
    return value


async def list_servers(ctx: Ctx) -> list[dict[str, Any]] | dict[str, Any]:
    """Every server the user may see (an admin: all), or one page of them when `pageSize`/`after` ask."""
    owner = None if ctx.me.is_admin else ctx.me.id
    size = _query_int(ctx, "pageSize", 1, MAX_PAGE_SIZE)
    after = _query_int(ctx, "after", 0, None)
    paged = size is not None or after is not None
    limit = (size or 100) + 1 if paged else None  # one more than the page: is there a next one?
    rows = await ctx.services.store.read(store_instances.portal_rows, owner, after_id=after, limit=limit)
    interval, now = ctx.services.settings.poll_interval, utcnow()
    if not paged:
        return [normalized_state(instance, agent, interval, now) for instance, agent in rows]
    page = rows[:limit - 1] if limit is not None else rows
    return {"items": [normalized_state(instance, agent, interval, now) for instance, agent in page],
            "next": page[-1][0].id if len(rows) > len(page) else None}


async def get_server(ctx: Ctx, server_id: int) -> dict[str, Any]:
    owner = None if ctx.me.is_admin else ctx.me.id
    rows = await ctx.services.store.read(store_instances.portal_rows, owner, server_id)
    if not rows:
        raise ApiError(404, "SERVER_NOT_FOUND", {"id": server_id})
    instance, agent = rows[0]
    return normalized_state(instance, agent, ctx.services.settings.poll_interval)


async def ready_instance(ctx: Ctx, server_id: int) -> Any:
    instance = await owned_instance(ctx, server_id)
    if instance.state != InstanceState.READY.value:
        raise ApiError(409, "SERVER_NOT_READY", {"state": instance.state})
    return instance


async def _power(ctx: Ctx, server_id: int, action: str) -> tuple[Any, int]:
    instance = await ready_instance(ctx, server_id)
    store = ctx.services.store
    if action != "stop" and await store.read(store_billing.is_suspended, instance.id):
        raise ApiError(403, "SERVER_SUSPENDED", {"id": server_id, "reason": "billing"})
    if not await store.run(store_instances.claim_power_action, instance.id, action, POWER_HOLD_SECONDS):
        raise ApiError(409, "POWER_ACTION_IN_PROGRESS", {"id": server_id})
    try:
        result = await ctx.services.agents.call(agent_target(instance), "POST", f"/{action}", timeout=30)
    finally:
        await store.run(store_instances.release_power_action, instance.id)
    return forward_agent_result(result)


async def start(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _power(ctx, server_id, "start")


async def stop(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _power(ctx, server_id, "stop")


async def restart(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _power(ctx, server_id, "restart")


async def console_command(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    instance = await ready_instance(ctx, server_id)
    result = await ctx.services.agents.call(agent_target(instance), "POST", "/console/command",
                                            json_body={"command": ctx.body.command})
    return forward_agent_result(result)


def server_suspender(services: Services) -> Callable[[int, list[int], str], Awaitable[None]]:
    """The billing scheduler's hook: stop each server and close its consoles with the suspension
    close code. Nothing is deleted; a suspended server cannot be started until the plan covers it."""

    async def suspend_servers(user_id: int, instance_ids: list[int], reason: str) -> None:
        for instance_id in instance_ids:
            instance = await services.store.run(store_instances.get_instance, instance_id)
            if instance is None or instance.state != InstanceState.READY.value:
                continue
            services.consoles.disconnect_instance(instance_id)
            result = await services.agents.call(agent_target(instance), "POST", "/stop", timeout=30)
            if not result.ok and result.status != 409:  # 409: already stopped
                raise RuntimeError(f"could not stop server {instance_id}: {result.status} {result.error}")
            await services.store.run(users.audit, "server.suspended", None, f"instance:{instance_id}",
                                     owner=user_id, reason=reason)

    return suspend_servers
