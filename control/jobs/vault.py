"""Vault connections (admin only): credentials the job backend uses to reach repositories and HTTP
endpoints. Secrets are sealed at rest (sealing.py) and never answered; `test` proves a connection
works with a real call under a timeout: `git ls-remote` for kind git, an authenticated GET for http."""

from __future__ import annotations

import base64
from typing import Any, Literal

import httpx
import pydantic

from gateway.errors import ApiError
from storage import jobs as job_store
from storage.clock import isoformat, utcnow
from storage.jobs import VaultConnection

from ..api import Body, Ctx
from .sealing import SecretBox, SecretUnreadable
from .sources import Credentials, SourceUnavailable, list_refs


class CreateConnectionBody(Body):
    name: pydantic.constr(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # type: ignore[valid-type]
    kind: Literal["git", "http"]
    url: pydantic.constr(min_length=1, max_length=1024)  # type: ignore[valid-type]
    username: pydantic.constr(min_length=1, max_length=255) | None = None  # type: ignore[valid-type]
    secret: pydantic.constr(min_length=1, max_length=8192)  # type: ignore[valid-type]


def connection_json(row: VaultConnection) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "kind": row.kind, "url": row.url, "username": row.username,
            "has_secret": bool(row.sealed_secret), "created_at": isoformat(row.created_at),
            "last_tested_at": isoformat(row.last_tested_at), "last_test_ok": row.last_test_ok,
            "last_test_error": row.last_test_error}


def secret_box(ctx: Ctx) -> SecretBox:
    box = ctx.services.extra.get("jobs.secret_box")
    if box is None:
        box = ctx.services.extra["jobs.secret_box"] = SecretBox(ctx.services.settings.jwt_secret)
    return box


def open_credentials(ctx: Ctx, row: VaultConnection) -> Credentials:
    return Credentials(row.username, secret_box(ctx).open(row.sealed_secret, row.name))


async def list_connections(ctx: Ctx) -> dict[str, Any]:
    rows = await job_store.run(ctx.services.store, job_store.list_vault_connections)
    return {"connections": [connection_json(row) for row in rows]}


async def create_connection(ctx: Ctx) -> tuple[dict[str, Any], int]:
    body: CreateConnectionBody = ctx.body
    if body.kind == "http" and not body.url.startswith(("http://", "https://")):
        raise ApiError(422, "VALIDATION_FAILED", [{"field": "url", "message": "http connections need an http(s) URL",
                                                   "type": "url"}])
    sealed = secret_box(ctx).seal(body.secret, body.name)
    try:
        row = await job_store.run(ctx.services.store, job_store.create_vault_connection, body.name, body.kind,
                                  body.url, body.username, sealed)
    except job_store.NameTaken as exc:
        raise ApiError(409, "NAME_TAKEN", {"field": "name"}) from exc
    return connection_json(row), 201


async def delete_connection(ctx: Ctx, connection_id: int) -> None:
    if not await job_store.run(ctx.services.store, job_store.delete_vault_connection, connection_id):
        raise ApiError(404, "CONNECTION_NOT_FOUND")


async def test_connection(ctx: Ctx, connection_id: int) -> dict[str, Any]:
    row = await job_store.run(ctx.services.store, job_store.vault_connection, connection_id)
    if row is None:
        raise ApiError(404, "CONNECTION_NOT_FOUND")
    timeout = ctx.services.settings.source_timeout
    ok, error, detail = False, None, {}
    try:
        credentials = open_credentials(ctx, row)
        if row.kind == "git":
            refs = await list_refs(row.url, credentials, timeout)
            ok, detail = True, {"refs": len(refs)}
        else:
            ok, error, detail = await _probe_http(row.url, credentials, timeout)
    except SecretUnreadable:
        error = "SECRET_UNREADABLE"
    except SourceUnavailable as exc:
        error = f"SOURCE_UNAVAILABLE: {exc}"
    await job_store.run(ctx.services.store, job_store.record_vault_test, row.id, ok, error, utcnow())
    return {"id": row.id, "ok": ok, "error": error, **detail}


async def _probe_http(url: str, credentials: Credentials, timeout: float) -> tuple[bool, str | None, dict[str, Any]]:
    if credentials.username:
        token = base64.b64encode(f"{credentials.username}:{credentials.secret}".encode()).decode()
        header = f"Basic {token}"
    else:
        header = f"Bearer {credentials.secret}"
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            response = await client.get(url, headers={"authorization": header})
    except httpx.HTTPError as exc:
        return False, f"UNREACHABLE: {type(exc).__name__}", {}
    if response.status_code >= 400:
        return False, f"HTTP_{response.status_code}", {"status": response.status_code}
    return True, None, {"status": response.status_code}
