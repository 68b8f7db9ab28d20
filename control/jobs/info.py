"""Installer- and UI-facing state: `GET /healthz` (liveness plus database), `GET /api/v1/runtime-state`
(agents, queue and release at a glance) and `GET /api/v1/server-info` (what this gateway is and
speaks). Reads only. A regular user's runtime state counts only their own jobs and the runners shared
with them (access.py's rule)."""

from __future__ import annotations

from typing import Any

import trio
from quart import Response

from storage import jobs as job_store
from storage.clock import isoformat, utcnow
from storage.db import is_postgres

from ..api import Ctx, json_response
from . import lifecycle
from .access import owner_filter, runners_for
from .present import runner_json
from .updates import Releases, running_version

API_VERSION = "v1"


async def healthz(ctx: Ctx) -> Response:
    database = await ctx.services.store.ping()
    return json_response({"status": "ok" if database else "degraded", "database": database},
                         200 if database else 503)


async def runtime_state(ctx: Ctx) -> dict[str, Any]:
    settings = ctx.services.settings

    def read() -> dict[str, Any]:
        now = utcnow()
        agents = [runner_json(r, now, settings.runner_offline_after) for r in runners_for(ctx.me)]
        counts = job_store.job_counts(owner_filter(ctx.me))
        return {
            "agents": {"total": len(agents), "online": sum(a["online"] for a in agents),
                       "active": sum(a["active"] for a in agents)},
            "jobs": {state: counts.get(state, 0) for state in lifecycle.STATES},
        }

    state = await job_store.run(ctx.services.store, read)
    releases = Releases(settings)
    current = await trio.to_thread.run_sync(releases.current)
    return {**state, "time": isoformat(utcnow()), "services": sorted(ctx.services.running),
            "release": {"running": running_version(), "current": current},
            "lease_ttl": settings.job_lease_ttl, "max_attempts": settings.job_max_attempts}


async def server_info(ctx: Ctx) -> dict[str, Any]:
    settings = ctx.services.settings
    return {"name": "zlh-gateway", "version": running_version(), "api_version": API_VERSION,
            "database": "postgresql" if is_postgres(ctx.services.store.db) else "sqlite",
            "public_url": settings.public_url or None, "time": isoformat(utcnow()),
            "runner_token_prefix": "zlhr_", "lease_ttl": settings.job_lease_ttl,
            "artifact_max_bytes": settings.artifact_max_bytes}
