"""Servers (game and dev runtime): normalized state read from storage — never a live agent call per
Portal request — and the control actions forwarded to the agent: start/stop/restart (one power action
at a time per server) and console commands."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Annotated, Any

import orjson
import pydantic

from gateway.agent_client import forward_agent_result
from gateway.errors import ApiError
from storage import billing as store_billing
from storage import instances as store_instances
from storage import users
from storage.clock import isoformat, utcnow

from .access import agent_target, grant, listing_owner, owned_instance, server_not_found
from .api import Body, Ctx, query_int
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


def stale_after(services: Services) -> float:
    """Seconds after which a poll result no longer stands for the agent: a few poll intervals, plus,
    with several replicas, the takeover bound — a replica's death pauses its agents' polls until a
    survivor takes them over, and that pause is not the agents' fault (they must not flap
    unreachable during every takeover). An agent that fails is still seen at once: a failed poll is
    stored as such."""
    window = services.settings.poll_interval * STALE_AFTER_INTERVALS
    if services.cluster is not None:
        window += services.settings.cluster_takeover_bound
    return float(window)



READY = InstanceState.READY.value  # read once: an Enum member's .value is a property lookup per row


def _embedded(text: str | None, empty: Any) -> Any:
    """A JSON column as stored, embedded in the answer as is (orjson.Fragment): never decoded here."""
    return orjson.Fragment(text) if text else empty


def normalized_state(instance: Any, agent: Any, stale_after: float, now: datetime | None = None) -> dict[str, Any]:
    """The Portal's view of one server (instance and agent as `store_instances.portal_rows` reads them).
    `agentReady` is the last semantic /ready, and it reads as false once that answer is older than
    `stale_after` seconds (see `stale_after`). A listing passes one `now` for all its rows."""
    now = utcnow() if now is None else now
    fresh = (agent is not None and agent.ready_checked_at is not None
             and now - agent.ready_checked_at <= timedelta(seconds=stale_after))
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


async def list_servers(ctx: Ctx) -> list[dict[str, Any]] | dict[str, Any]:
    """Every server the user may see (an admin: all), or one page of them when `pageSize`/`after` ask."""
    paged = ctx.query.get("pageSize") is not None or ctx.query.get("after") is not None
    size = query_int(ctx, "pageSize", 100, 1, MAX_PAGE_SIZE)
    after = query_int(ctx, "after", 0) if ctx.query.get("after") is not None else None
    limit = size + 1 if paged else None  # one more than the page: is there a next one?
    rows = await ctx.services.store.read(store_instances.portal_rows, listing_owner(ctx.me), after_id=after,
                                         limit=limit)
    window, now = stale_after(ctx.services), utcnow()
    if limit is None:
        return [normalized_state(instance, agent, window, now) for instance, agent in rows]
    page = rows[:limit - 1]
    return {"items": [normalized_state(instance, agent, window, now) for instance, agent in page],
            "next": page[-1][0].id if len(rows) > len(page) else None}


async def server_row(ctx: Ctx, server_id: int) -> tuple[Any, Any]:
    """One server and its agent state with the JSON columns decoded, if `ctx.me` may see it."""
    rows = await ctx.services.store.read(store_instances.server_rows, None, server_id)
    grant(ctx.me, rows[0][0].owner_id if rows else None, server_not_found(server_id))
    instance, agent = rows[0]
    return instance, agent


async def get_server(ctx: Ctx, server_id: int) -> dict[str, Any]:
    rows = await ctx.services.store.read(store_instances.portal_rows, None, server_id)
    grant(ctx.me, rows[0][0].owner_id if rows else None, server_not_found(server_id))
    instance, agent = rows[0]
    return normalized_state(instance, agent, stale_after(ctx.services))


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
