"""Prometheus service discovery: the `http_sd` endpoint listing each published agent's metrics
target with labels. Answers `Content-Type: application/json` (Prometheus rejects anything else) and
only to the configured bearer token; it reads published state and never calls an agent."""

from __future__ import annotations

import hmac
from typing import Any

from quart import Response

from gateway.errors import ApiError
from storage import edge as edge_store

from ..api import Ctx, bearer_token, json_response
from . import PublishedInstance

TARGET_GROUPS_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["targets", "labels"],
        "properties": {"targets": {"type": "array", "items": {"type": "string"}},
                       "labels": {"type": "object", "additionalProperties": {"type": "string"}}},
    },
}


def target_groups(instances: list[PublishedInstance], metrics_path: str) -> list[dict[str, Any]]:
    """One target group per published agent."""
    return [
        {
            "targets": [f"{i.agent_host}:{i.agent_port}"],
            "labels": {
                "__metrics_path__": metrics_path,
                "zlh_instance_id": str(i.instance_id),
                "zlh_vmid": str(i.vmid),
                "zlh_kind": i.kind,
                "zlh_name": i.name,
                "zlh_engine_type": i.engine_type,
            },
        }
        for i in instances
        if i.agent_host and i.agent_port
    ]


async def service_discovery(ctx: Ctx) -> Response:
    expected = ctx.services.settings.prometheus_sd_token
    if not expected:
        raise ApiError(404, "NOT_FOUND", {"reason": "Prometheus service discovery is not configured"})
    presented = bearer_token(ctx.headers) or ""
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise ApiError(401, "UNAUTHORIZED", {"reason": "missing or wrong service-discovery token"},
                       headers={"WWW-Authenticate": "Bearer"})
    records = await ctx.services.store.run(edge_store.published_records)
    instances = [PublishedInstance(**record) for record in records]
    return json_response(target_groups(instances, ctx.services.settings.agent_metrics_path))
