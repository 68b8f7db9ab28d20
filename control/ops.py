"""Operations routes: liveness, readiness, Prometheus metrics, the OpenAPI document, and `/` (what
this service is). The bodies of /health, /ready, /live and / also carry the fields the dev
environments contract (seed 004) gives them, so there is one implementation of each for both."""

from __future__ import annotations

import time
from importlib import metadata
from typing import Any

from quart import Response

from gateway.errors import ApiError
from storage import fleet

from .api import Ctx, json_response

REQUIRED_SERVICES: set[str] = {"server"}
SERVICE = "zlh-gateway"


def _version() -> str:
    try:
        return metadata.version(SERVICE)
    except metadata.PackageNotFoundError:
        return "0.0.0"


VERSION = _version()


def uptime_text(seconds: float) -> str:
    """Whole seconds the way the seed writes an uptime: `45s`, `2m5s`, `2h15m30s`."""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


async def health(ctx: Ctx) -> dict[str, Any]:
    return {"status": "ok", "uptime": uptime_text(time.monotonic() - ctx.services.started), "service": SERVICE,
            "version": VERSION}


async def live(ctx: Ctx) -> dict[str, Any]:
    return {"status": "alive"}


async def service_info(ctx: Ctx) -> dict[str, Any]:
    return {"service": SERVICE, "version": VERSION, "status": "running",
            "endpoints": {"health": "/health", "ready": "/ready", "live": "/live", "api": "/api/v1",
                          "openapi": "/openapi.json", "metrics": "/metrics"}}


async def ready(ctx: Ctx) -> Response:
    database = await ctx.services.store.ping()
    missing = sorted(ctx.services.extra.get("required_services", REQUIRED_SERVICES) - ctx.services.running)
    ok = database and not missing
    body = {"status": "ready" if ok else "not ready", "ready": ok, "database": database,
            "services": sorted(ctx.services.running), "missing": missing}
    return json_response(body, 200 if body["ready"] else 503)


def watch_live_state(services: Any) -> None:
    """The /metrics gauges that are views of this process's live state, read at each scrape."""
    m = services.metrics
    m.watch(m.agents_late, services.poller.agents_late)
    m.watch(m.agents_unreachable, services.poller.agents_unreachable)
    m.watch(m.agents_polled_here, services.poller.agents_known)
    m.watch(m.ide_websockets, lambda: services.ide.proxy.open_websockets)
    membership = services.cluster
    if membership is not None:  # one process (SQLite) holds no leases: it owns everything
        m.watch(m.slots_held, membership.slots_held)
        m.watch(m.cluster_leader, lambda: float(membership.is_leader()))
    else:
        m.watch(m.cluster_leader, lambda: 1.0)


async def metrics(ctx: Ctx) -> Response:
    m = ctx.services.metrics
    backlog = await ctx.services.store.read(fleet.outbox_backlog)  # shared state: read from the database
    m.outbox_pending.set(backlog["pending"])
    m.outbox_failing.set(backlog["failing"])
    return Response(m.render(), content_type=m.content_type)


async def openapi(ctx: Ctx) -> Response:
    document = ctx.services.extra.get("openapi")
    if document is None:
        raise ApiError(503)
    return json_response(document)
