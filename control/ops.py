"""Operations routes: liveness, readiness, Prometheus metrics, the OpenAPI document."""

from __future__ import annotations

from typing import Any

from quart import Response

from gateway.errors import ApiError

from .api import Ctx, json_response

REQUIRED_SERVICES: set[str] = {"server"}


async def health(ctx: Ctx) -> dict[str, Any]:
    return {"status": "ok"}


async def ready(ctx: Ctx) -> Response:
    database = await ctx.services.store.ping()
    missing = sorted(ctx.services.extra.get("required_services", REQUIRED_SERVICES) - ctx.services.running)
    body = {"ready": database and not missing, "database": database, "services": sorted(ctx.services.running),
            "missing": missing}
    return json_response(body, 200 if body["ready"] else 503)


async def metrics(ctx: Ctx) -> Response:
    return Response(ctx.services.metrics.render(), content_type=ctx.services.metrics.content_type)


async def openapi(ctx: Ctx) -> Response:
    document = ctx.services.extra.get("openapi")
    if document is None:
        raise ApiError(503)
    return json_response(document)
