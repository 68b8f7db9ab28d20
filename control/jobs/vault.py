"""Vault connections: credentials the job backend uses to reach repositories and HTTP endpoints. Each
belongs to the user who created it (access.py's rule: others get a 404, admins see all). Secrets are
sealed at rest (sealing.py), never answered, never logged; `test` proves a connection works with a real
call under a timeout: `git ls-remote` for kind git, an authenticated GET for http.

Where a secret may go: a connection is usable only by projects of its owner (an admin's by admins'
projects), and its secret is sent only to the origin (scheme, host, port) of the connection's own URL
(`credentials_for`); the URL itself passes targets.py's rule when the connection is created and again
before every call."""

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
from .access import owner_filter, owns
from .sealing import SecretBox, SecretUnreadable
from .sources import Credentials, SourceUnavailable, list_refs
from .targets import AllowedSources, SourceRefused, Target, check_target, parse_origin


class CreateConnectionBody(Body):
    name: pydantic.constr(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # type: ignore[valid-type]
    kind: Literal["git", "http"]
    url: pydantic.constr(min_length=1, max_length=1024)  # type: ignore[valid-type]
    username: pydantic.constr(min_length=1, max_length=255) | None = None  # type: ignore[valid-type]
    secret: pydantic.constr(min_length=1, max_length=8192)  # type: ignore[valid-type]


def connection_json(row: VaultConnection) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "owner_id": row.owner_id, "kind": row.kind, "url": row.url,
            "username": row.username,
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


def allowed_sources(ctx: Ctx) -> AllowedSources:
    return AllowedSources.parse(ctx.services.settings.jobs_allowed_sources)


async def checked_target(ctx: Ctx, url: str, field: str, *, http_only: bool = False) -> Target:
    """targets.py's rule for `url`, as a 400 naming `field` when it is refused."""
    try:
        return await check_target(url, allowed_sources(ctx), ctx.services.settings.source_timeout,
                                  http_only=http_only)
    except SourceRefused as exc:
        raise ApiError(400, "SOURCE_REFUSED", [{"field": field, "message": str(exc), "type": "source"}]) from exc


def usable_connection(name: str, project_owner_id: int | None) -> VaultConnection | None:
    """Inside a unit: the connection `name` if projects of `project_owner_id` may use it, else None
    (the same None as for a name that does not exist)."""
    row = job_store.vault_connection_by_name(name)
    if row is None or row.owner_id == project_owner_id:
        return row
    admins = job_store.user_ids_with_role("admin")
    if row.owner_id in admins and (project_owner_id is None or project_owner_id in admins):
        return row
    return None


def same_origin(target: Target, row: VaultConnection) -> bool:
    """Whether `target` is on the origin of the connection's own URL (never true for a local path)."""
    return target.origin is not None and target.origin == parse_origin(row.url)


def credentials_for(ctx: Ctx, target: Target, row: VaultConnection | None) -> Credentials | None:
    """The connection's credentials for a call to `target`: only on the connection's own origin."""
    if row is None or not same_origin(target, row):
        return None
    return open_credentials(ctx, row)


def _owned_connection(ctx: Ctx, connection_id: int) -> VaultConnection:
    row = job_store.vault_connection(connection_id)
    if row is None or not owns(ctx.me, row.owner_id):
        raise ApiError(404, "CONNECTION_NOT_FOUND")
    return row


async def list_connections(ctx: Ctx) -> dict[str, Any]:
    rows = await job_store.run(ctx.services.store, job_store.list_vault_connections, owner_filter(ctx.me))
    return {"connections": [connection_json(row) for row in rows]}


async def create_connection(ctx: Ctx) -> tuple[dict[str, Any], int]:
    body: CreateConnectionBody = ctx.body
    await checked_target(ctx, body.url, "url", http_only=body.kind == "http")
    sealed = secret_box(ctx).seal(body.secret, body.name)
    try:
        row = await job_store.run(ctx.services.store, job_store.create_vault_connection, body.name, body.kind,
                                  body.url, body.username, sealed, ctx.me.id)
    except job_store.NameTaken as exc:
        raise ApiError(409, "NAME_TAKEN", {"field": "name"}) from exc
    return connection_json(row), 201


async def delete_connection(ctx: Ctx, connection_id: int) -> None:
    def delete() -> None:
        _owned_connection(ctx, connection_id)
        job_store.delete_vault_connection(connection_id)

    await job_store.run(ctx.services.store, delete)


async def test_connection(ctx: Ctx, connection_id: int) -> dict[str, Any]:
    row = await job_store.run(ctx.services.store, _owned_connection, ctx, connection_id)
    target = await checked_target(ctx, row.url, "url", http_only=row.kind == "http")
    timeout = ctx.services.settings.source_timeout
    ok, error, detail = False, None, {}
    try:
        credentials = open_credentials(ctx, row)
        if row.kind == "git":
            refs = await list_refs(target, credentials, timeout)
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
