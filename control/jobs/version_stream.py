"""`GET /api/v1/pipelines/{id}/version-resolve`: resolve a pipeline's source ref to a commit and a
version, streamed as Server-Sent Events so the UI shows progress while git answers:

    event: started   data: {"pipeline_id", "source_ref", "repository"}
    event: ref       data: {"name", "ref", "sha", "kind"}          (one per branch/tag seen)
    event: resolved  data: {"source_ref", "sha", "kind", "version"}
    event: error     data: {"error": CODE, "details": …}           (instead of resolved)
    event: done      data: {}

Errors found before streaming starts (unknown pipeline or another tenant's, no repository, a refused
repository) are ordinary JSON envelopes; the same ownership rule as every pipeline route applies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from quart import Response

from gateway.errors import ApiError, envelope
from storage import jobs as job_store

from ..api import Ctx
from .runs import pipeline_or_404, source_context, source_target
from .sources import SourceUnavailable, list_refs, resolve


def sse_event(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def version_resolve(ctx: Ctx, pipeline_id: int) -> Response:
    def context() -> Any:
        return source_context(ctx, pipeline_or_404(ctx, pipeline_id).project)

    project, row, _ = await job_store.run(ctx.services.store, context)
    if not project.repository:
        raise ApiError(409, "NO_REPOSITORY", {"project": project.name})
    target, credentials = await source_target(ctx, project, row)
    requested = ctx.query.get("source_ref") or project.default_ref
    timeout = ctx.services.settings.source_timeout

    async def events() -> AsyncIterator[bytes]:
        yield sse_event("started", {"pipeline_id": pipeline_id, "source_ref": requested,
                                    "repository": project.repository})
        try:
            refs = await list_refs(target, credentials, timeout)
        except SourceUnavailable as exc:
            yield sse_event("error", envelope("SOURCE_UNAVAILABLE", {"reason": str(exc)}))
        else:
            for ref in refs:
                yield sse_event("ref", {"name": ref.name, "ref": ref.ref, "sha": ref.sha, "kind": ref.kind})
            resolution = resolve(requested, refs)
            if resolution is None:
                yield sse_event("error", envelope("REF_NOT_FOUND", {"source_ref": requested}))
            else:
                yield sse_event("resolved", {"source_ref": resolution.source_ref, "sha": resolution.sha,
                                             "kind": resolution.kind, "version": resolution.version})
        yield sse_event("done", {})

    response = Response(events(), content_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.timeout = None
    return response
