"""The accounts admin API, `/api/admin/…`: list and search accounts, read one, disable, enable,
delete (refused while the account owns servers or environments), change the role, and read the audit
log. Admin only (403 for users, by the route's `auth`); the work is control/accounts.py's."""

from __future__ import annotations

from typing import Any, Literal

from gateway.errors import ApiError
from storage import users
from storage.clock import isoformat

from . import accounts
from .api import Body, Ctx, Route, query_int

MAX_PAGE_SIZE = 100


class RoleBody(Body):
    role: Literal["user", "admin"]


ACCOUNT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "id": {"type": "integer"}, "email": {"type": "string"}, "role": {"enum": list(accounts.ROLES)},
    "plan": {"type": "string"}, "state": {"enum": ["active", "disabled", "deleted"]},
    "createdAt": {"type": "string"}, "disabledAt": {"type": ["string", "null"]},
    "deletedAt": {"type": ["string", "null"]}}}
ACCOUNT_PAGE_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "users": {"type": "array", "items": ACCOUNT_SCHEMA}, "page": {"type": "integer"},
    "pageSize": {"type": "integer"}, "total": {"type": "integer"}}}
AUDIT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "entries": {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer"}, "at": {"type": "string"}, "actorId": {"type": ["integer", "null"]},
        "action": {"type": "string"}, "target": {"type": ["string", "null"]}, "details": {}}}},
    "next": {"type": ["integer", "null"], "description": "pass as `before` for the next (older) page"}}}


def _optional_int(ctx: Ctx, name: str, low: int) -> int | None:
    return query_int(ctx, name, 0, low) if ctx.query.get(name) else None


def _text_param(ctx: Ctx, name: str, max_length: int) -> str | None:
    value = ctx.query.get(name)
    if value is not None and len(value) > max_length:
        raise ApiError(400, "VALIDATION_FAILED", [{"field": name, "message": f"at most {max_length} characters"}])
    return value or None


async def list_users(ctx: Ctx) -> dict[str, Any]:
    page = query_int(ctx, "page", 1, 1)
    size = query_int(ctx, "pageSize", 20, 1, MAX_PAGE_SIZE)
    email = _text_param(ctx, "email", 320)
    rows, total = await ctx.services.store.read(users.list_users, email, (page - 1) * size, size)
    return {"users": [accounts.account_json(row) for row in rows], "page": page, "pageSize": size, "total": total}


async def get_user(ctx: Ctx, user_id: int) -> dict[str, Any]:
    return await accounts.get_account(ctx.services, user_id)


async def disable_user(ctx: Ctx, user_id: int) -> dict[str, Any]:
    return await accounts.disable(ctx.services, ctx.me.id, user_id)


async def enable_user(ctx: Ctx, user_id: int) -> dict[str, Any]:
    return await accounts.enable(ctx.services, ctx.me.id, user_id)


async def delete_user(ctx: Ctx, user_id: int) -> dict[str, Any]:
    return await accounts.delete(ctx.services, ctx.me.id, user_id)


async def set_role(ctx: Ctx, user_id: int) -> dict[str, Any]:
    return await accounts.set_role(ctx.services, ctx.me.id, user_id, ctx.body.role)


def audit_json(entry: Any) -> dict[str, Any]:
    return {"id": entry.id, "at": isoformat(entry.at), "actorId": entry.actor_id, "action": entry.action,
            "target": entry.target, "details": entry.details}


async def audit_log(ctx: Ctx) -> dict[str, Any]:
    limit = query_int(ctx, "limit", 50, 1, MAX_PAGE_SIZE)
    entries = await ctx.services.store.read(
        users.audit_entries, action_prefix=_text_param(ctx, "action", 64), target=_text_param(ctx, "target", 128),
        actor_id=_optional_int(ctx, "actor", 0), before_id=_optional_int(ctx, "before", 1), limit=limit)
    return {"entries": [audit_json(entry) for entry in entries],
            "next": entries[-1].id if len(entries) == limit else None}


def admin_routes() -> list[Route]:
    base = "/api/admin/users"
    item = f"{base}/<int:user_id>"
    tags = ("admin",)
    page_params = [{"name": "email", "in": "query", "schema": {"type": "string", "maxLength": 320},
                    "description": "only accounts whose email contains this text"},
                   {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                   {"name": "pageSize", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                  "maximum": MAX_PAGE_SIZE}}]
    audit_params = [{"name": "action", "in": "query", "schema": {"type": "string"}, "description": "action prefix"},
                    {"name": "target", "in": "query", "schema": {"type": "string"}, "description": "e.g. user:7"},
                    {"name": "actor", "in": "query", "schema": {"type": "integer"}},
                    {"name": "before", "in": "query", "schema": {"type": "integer"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                               "maximum": MAX_PAGE_SIZE}}]
    ends = " Ends every login of the account at once, on every replica (access tokens, consoles, IDE sessions)."
    return [
        Route("GET", base, list_users, "Accounts, by id, paged; `email` searches", auth="admin",
              response=ACCOUNT_PAGE_SCHEMA, tags=tags, extra_doc={"parameters": page_params}),
        Route("GET", item, get_user, "One account", auth="admin", response=ACCOUNT_SCHEMA, tags=tags),
        Route("POST", f"{item}/disable", disable_user, "Disable an account." + ends, auth="admin",
              response=ACCOUNT_SCHEMA, tags=tags),
        Route("POST", f"{item}/enable", enable_user, "Enable a disabled account (it logs in again)", auth="admin",
              response=ACCOUNT_SCHEMA, tags=tags),
        Route("DELETE", item, delete_user,
              "Delete an account (soft: the row stays for the audit log; its email is freed). 409 "
              "ACCOUNT_HAS_RESOURCES while it owns servers, dev containers or environments." + ends,
              auth="admin", response=ACCOUNT_SCHEMA, tags=tags),
        Route("POST", f"{item}/role", set_role, "Set the role (user | admin)." + ends, auth="admin",
              body=RoleBody, response=ACCOUNT_SCHEMA, tags=tags),
        Route("GET", "/api/admin/audit", audit_log, "The audit log, newest first, filtered and paged",
              auth="admin", response=AUDIT_SCHEMA, tags=tags, extra_doc={"parameters": audit_params}),
    ]

