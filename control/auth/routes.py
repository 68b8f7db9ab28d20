"""Auth routes: register, login, refresh (rotating, reuse revokes the family), logout, password reset,
and /api/me. Login and reset are rate-limited per account and per client address. Whatever ends a
login (a revoked family) ends, on every replica and at once, its access tokens and the IDE sessions
opened from it (control/cluster.py::end_sessions; the rule is control/sessions.py); a password reset
ends every login of the account and closes its consoles too."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pydantic
import trio

from gateway.errors import ApiError
from storage import ratelimit, users
from storage import tokens as token_store
from storage.clock import utcnow

from ..api import Body, Ctx
from ..cluster import end_sessions
from ..services import Services
from .passwords import HashCost, check_password, hash_password
from .tokens import TokenKind, token_hash

# One email rule for register, login and reset: an address can hold no whitespace or control
# character, and is at most 254 characters (RFC 5321's path limit; the column holds it on PostgreSQL).
Email = pydantic.constr(strip_whitespace=True, min_length=3, max_length=254,
                        pattern=r"^[^@\s\x00-\x1f\x7f-\x9f]+@[^@\s\x00-\x1f\x7f-\x9f]+\.[^@\s\x00-\x1f\x7f-\x9f.]+$")
Password = pydantic.constr(min_length=8, max_length=256)


class Credentials(Body):
    email: Email  # type: ignore[valid-type]
    password: Password  # type: ignore[valid-type]


class LoginBody(Body):
    email: Email  # type: ignore[valid-type]
    password: pydantic.constr(min_length=1, max_length=256)  # type: ignore[valid-type]


class RefreshBody(Body):
    refresh_token: pydantic.constr(min_length=1, max_length=4096) = pydantic.Field(alias="refreshToken")  # type: ignore[valid-type]


class ResetRequestBody(Body):
    email: Email  # type: ignore[valid-type]


class ResetConfirmBody(Body):
    token: pydantic.constr(min_length=10, max_length=256)  # type: ignore[valid-type]
    password: Password  # type: ignore[valid-type]


USER_SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"}, "email": {"type": "string"},
                                                "role": {"type": "string"}, "plan": {"type": "string"}}}
SESSION_SCHEMA = {"type": "object", "properties": {
    "accessToken": {"type": "string"}, "refreshToken": {"type": "string"},
    "expiresIn": {"type": "integer"}, "user": USER_SCHEMA}}

def user_json(user: Any) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "role": user.role, "plan": user.plan}


async def _limit(services: Services, *keys: tuple[str, int]) -> None:
    window = services.settings.rate_limit_window

    def count() -> int:
        return max(ratelimit.hit(key, limit, window) for key, limit in keys)

    retry = await services.store.run(count)
    if retry:
        raise ApiError(429, "RATE_LIMITED", {"retryAfter": retry}, headers={"Retry-After": str(retry)})


def rate_limit_pruner(services: Services) -> Callable[..., Awaitable[None]]:
    """Background service (once per fleet): delete lapsed rate-limit buckets every window."""

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        window = services.settings.rate_limit_window
        task_status.started()
        while True:
            await trio.sleep(window)
            await services.store.run(ratelimit.prune, window)

    return run


async def issue_session(services: Services, user: Any, family_id: str | None = None) -> dict[str, Any]:
    """Access + refresh token for `user`; a new family unless rotating within one."""
    settings = services.settings
    tokens = services.tokens
    new_family = family_id is None
    family = family_id or secrets.token_urlsafe(18)
    refresh = tokens.issue(TokenKind.REFRESH, user.id, settings.refresh_token_ttl, fam=family)
    access = tokens.issue(TokenKind.ACCESS, user.id, settings.access_token_ttl, role=user.role, fam=family)
    expires = utcnow() + timedelta(seconds=settings.refresh_token_ttl)

    def persist() -> None:
        if new_family:
            token_store.start_family(family, user.id)
        token_store.add_refresh_token(family, token_hash(refresh), expires)

    await services.store.run(persist)
    return {"accessToken": access, "refreshToken": refresh, "expiresIn": settings.access_token_ttl,
            "tokenType": "Bearer", "user": user_json(user)}


async def register(ctx: Ctx) -> tuple[dict[str, Any], int]:
    body: Credentials = ctx.body
    await _limit(ctx.services, (f"register:ip:{ctx.client}", ctx.services.settings.login_limit_per_address))
    password_hash = await hash_password(body.password, HashCost.from_settings(ctx.services.settings))

    def create() -> Any:
        user = users.create_user(body.email, password_hash, plan=ctx.services.settings.default_plan)
        users.audit("user.register", user.id, f"user:{user.id}")
        return user

    try:
        user = await ctx.services.store.run(create)
    except users.EmailTaken as exc:
        raise ApiError(409, "EMAIL_TAKEN", {"field": "email"}) from exc
    return await issue_session(ctx.services, user), 201


async def login(ctx: Ctx) -> dict[str, Any]:
    body: LoginBody = ctx.body
    settings = ctx.services.settings
    email = users.normalize_email(body.email)
    await _limit(ctx.services, (f"login:acct:{email}", settings.login_limit_per_account),
                 (f"login:ip:{ctx.client}", settings.login_limit_per_address))
    user = await ctx.services.store.run(users.user_by_email, email)
    # An unknown email costs the same as a wrong password (the dummy hash has the real parameters).
    check = await check_password(body.password, user.password_hash if user else None,
                                 HashCost.from_settings(settings))
    if user is None or not check.valid or user.disabled_at is not None:
        raise ApiError(401, "INVALID_CREDENTIALS")

    def record() -> None:
        if check.rehashed is not None:  # an scrypt or outdated argon2 hash: replaced now it was proven
            users.set_password(user.id, check.rehashed)
        users.audit("user.login", user.id, f"user:{user.id}", client=ctx.client)

    await ctx.services.store.run(record)
    return await issue_session(ctx.services, user)


async def refresh(ctx: Ctx) -> dict[str, Any]:
    token = ctx.body.refresh_token
    claims = ctx.services.tokens.verify(TokenKind.REFRESH, token)
    outcome = await ctx.services.store.run(token_store.use_refresh_token, token_hash(token))
    if outcome.user_id is None:
        if outcome.reason == "reused":
            await ctx.services.store.run(
                lambda: users.audit("auth.refresh_reuse", int(claims["sub"]), f"family:{claims.get('fam')}"))
            await end_sessions(ctx.services.events, user=int(claims["sub"]), families=[claims["fam"]])
        raise ApiError(401, "REFRESH_TOKEN_REUSED" if outcome.reason == "reused" else "INVALID_TOKEN")
    user = await ctx.services.store.run(users.user_by_id, outcome.user_id)
    return await issue_session(ctx.services, user, family_id=claims["fam"])


async def logout(ctx: Ctx) -> None:
    token = ctx.body.refresh_token
    claims = ctx.services.tokens.verify(TokenKind.REFRESH, token)

    def revoke() -> str | None:
        family = token_store.family_of(token_hash(token))
        if family is not None:
            token_store.revoke_family(family, "logout")
        return family

    family = await ctx.services.store.run(revoke)
    if family is not None:
        await end_sessions(ctx.services.events, user=int(claims["sub"]), families=[family])


async def password_reset_request(ctx: Ctx) -> tuple[dict[str, Any], int]:
    email = users.normalize_email(ctx.body.email)
    settings = ctx.services.settings
    await _limit(ctx.services, (f"reset:acct:{email}", 5), (f"reset:ip:{ctx.client}", settings.login_limit_per_address))
    token = secrets.token_urlsafe(32)
    expires = utcnow() + timedelta(seconds=settings.password_reset_ttl)

    def record() -> Any:
        user = users.user_by_email(email)
        if user is not None:
            token_store.add_password_reset(user.id, token_hash(token), expires)
            users.audit("auth.reset_requested", user.id, f"user:{user.id}")
        return user

    user = await ctx.services.store.run(record)
    if user is not None:
        base = settings.public_url.rstrip("/") or ""
        await ctx.services.mailer.send(
            user.email, "Reset your ZLH password",
            f"Use this one-time code within {settings.password_reset_ttl // 60} minutes:\n\n{token}\n\n"
            f"{base}/reset-password?token={token}\n",
        )
    # Same answer whether or not the account exists.
    return {"status": "accepted"}, 202


async def password_reset_confirm(ctx: Ctx) -> dict[str, Any]:
    body: ResetConfirmBody = ctx.body
    await _limit(ctx.services, (f"reset-confirm:ip:{ctx.client}", ctx.services.settings.login_limit_per_address))
    password_hash = await hash_password(body.password, HashCost.from_settings(ctx.services.settings))

    def confirm() -> tuple[int, list[str]] | None:
        user_id = token_store.use_password_reset(token_hash(body.token))
        if user_id is None:
            return None
        users.set_password(user_id, password_hash)
        ended = token_store.revoke_all_families(user_id, "password-reset")
        users.audit("auth.password_reset", user_id, f"user:{user_id}")
        return user_id, ended

    confirmed = await ctx.services.store.run(confirm)
    if confirmed is None:
        raise ApiError(400, "INVALID_RESET_TOKEN")
    user_id, ended = confirmed
    # Every login ended: its access tokens, IDE sessions and consoles, on whichever replica holds them.
    await end_sessions(ctx.services.events, user=user_id, families=ended, all_logins=True)
    return {"status": "password-changed"}


async def me(ctx: Ctx) -> dict[str, Any]:
    user = await ctx.services.store.run(users.user_by_id, ctx.me.id)
    if user is None or users.account_state(user) != "active":
        raise ApiError(401, "UNAUTHORIZED")
    return user_json(user)
