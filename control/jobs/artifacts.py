"""Job artifacts on disk: a runner streams one file per request into
`<data_dir>/artifacts/<job id>/<name>` (chunk by chunk, hashed on the way, never whole in memory,
capped by Settings.artifact_max_bytes); runners and operators list and download them.

A partial upload never becomes visible: bytes go to a temporary file that is renamed into place only
after the last chunk, and removed on any failure or disconnect. Never trusts a name as a path."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import trio
from quart import Response

from gateway.errors import ApiError
from gateway.server import Exchange
from gateway.streams import declared_length
from storage import jobs as job_store
from storage.jobs import Runner

from ..api import Ctx, CurrentUser
from ..services import Services
from . import lifecycle
from .access import as_runner, job_visible, runner_or_user
from .present import artifact_json

ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$")
CHUNK_IDLE_TIMEOUT = 60.0  # seconds a stalled upload may go without a byte
DOWNLOAD_CHUNK = 1024 * 1024


def job_dir(services: Services, job_id: int) -> Path:
    return services.settings.data_dir / "artifacts" / str(job_id)


def remove_job_files(services: Services, job_ids: list[int]) -> None:
    """Blocking: delete the artifact directories of deleted jobs (run it in a thread)."""
    for job_id in job_ids:
        directory = job_dir(services, job_id)
        if directory.is_dir():
            for child in directory.iterdir():
                child.unlink(missing_ok=True)
            directory.rmdir()


def artifact_name(value: str | None) -> str:
    if value is None or not ARTIFACT_NAME.match(value):
        raise ApiError(422, "VALIDATION_FAILED", [{"field": "name", "message": "artifact name must match "
                                                    + ARTIFACT_NAME.pattern, "type": "value_error"}])
    return value


async def upload_artifact(ctx: Ctx, job_id: int, chunks: AsyncIterator[bytes],
                          length: int | None) -> dict[str, Any]:
    """Stream one artifact to disk. Served on the data plane (see `artifact_upload_handler`), so the
    body is pulled off the socket only as fast as the disk takes it and is never held whole."""
    cap = ctx.services.settings.artifact_max_bytes
    if length is not None and length > cap:
        raise ApiError(413, "ARTIFACT_TOO_LARGE", {"max_bytes": cap})
    name = artifact_name(ctx.query.get("name"))

    def held(runner: Runner) -> str:
        job = job_store.job_by_id(job_id)
        if job is None:
            raise ApiError(404, "JOB_NOT_FOUND")
        if job.agent_id != runner.id or job.status not in lifecycle.LIVE:
            raise ApiError(409, "LEASE_LOST", {"job_id": job.id, "status": job.status, "error": job.error})
        return runner.id

    await as_runner(ctx, held)
    directory = trio.Path(job_dir(ctx.services, job_id))
    await directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{name}.{secrets.token_hex(6)}.part"
    digest = hashlib.sha256()
    size = 0
    try:
        async with await trio.open_file(partial, "wb") as sink:
            iterator = chunks.__aiter__()
            while True:
                with trio.fail_after(CHUNK_IDLE_TIMEOUT):
                    try:
                        chunk = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                size += len(chunk)
                if size > cap:
                    raise ApiError(413, "ARTIFACT_TOO_LARGE", {"max_bytes": cap})
                digest.update(chunk)
                await sink.write(chunk)
        await partial.rename(directory / name)
    except trio.TooSlowError as exc:
        raise ApiError(408, "REQUEST_TIMEOUT", {"reason": "upload stalled"}) from exc
    finally:
        with trio.CancelScope(shield=True):
            await partial.unlink(missing_ok=True)

    def record(runner: Runner) -> dict[str, Any]:
        held(runner)
        return artifact_json(job_store.record_artifact(job_id, name, size, digest.hexdigest()))

    return await as_runner(ctx, record)


def artifact_upload_handler(services: Services) -> Callable[[Exchange, dict[str, str]], Awaitable[None]]:
    """The data-plane route for `POST /api/v1/jobs/{id}/artifacts`."""

    async def handle(exchange: Exchange, params: dict[str, str]) -> None:
        request_head = exchange.request
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request_head.headers}
        ctx = Ctx(services, None, None, dict(parse_qsl(request_head.query)), request_head.client or "unknown",
                  headers)
        artifact = await upload_artifact(ctx, int(params["job_id"]), exchange.body(), declared_length(exchange))
        await exchange.respond(201, json.dumps(artifact).encode())

    return handle


async def list_artifacts(ctx: Ctx, job_id: int) -> dict[str, Any]:
    def listing(caller: Runner | CurrentUser) -> dict[str, Any]:
        job = job_store.job_by_id(job_id)
        if job is None or not job_visible(caller, job):
            raise ApiError(404, "JOB_NOT_FOUND")
        return {"job_id": job.id, "artifacts": [artifact_json(a) for a in job_store.list_artifacts(job.id)]}

    return await runner_or_user(ctx, listing)


async def download_artifact(ctx: Ctx, job_id: int, name: str) -> Response:
    name = artifact_name(name)

    def find(caller: Runner | CurrentUser) -> Any:
        job = job_store.job_by_id(job_id)
        if job is None or not job_visible(caller, job):
            raise ApiError(404, "JOB_NOT_FOUND")
        found = job_store.artifact(job.id, name)
        if found is None:
            raise ApiError(404, "ARTIFACT_NOT_FOUND")
        return found

    found = await runner_or_user(ctx, find)
    path = trio.Path(job_dir(ctx.services, job_id) / name)
    if not await path.is_file():
        raise ApiError(404, "ARTIFACT_NOT_FOUND", {"reason": "file missing on disk"})

    async def stream() -> AsyncIterator[bytes]:
        async with await trio.open_file(path, "rb") as source:
            while chunk := await source.read(DOWNLOAD_CHUNK):
                yield chunk

    response = Response(stream(), content_type="application/octet-stream", headers={
        "Content-Length": str(found.size), "X-Checksum-Sha256": found.sha256,
        "Content-Disposition": f'attachment; filename="{name}"'})
    response.timeout = None  # a large download must not be cut at RESPONSE_TIMEOUT
    return response
