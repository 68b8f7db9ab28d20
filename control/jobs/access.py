"""Who is calling the job backend: a runner agent (per-runner bearer token, stored hashed) or an
operator (a gateway access token). Runner tokens carry a fixed prefix so one header serves both on
the routes runners and the UI share. Never compares a plaintext token with anything but its hash."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from gateway.errors import ApiError
from storage import jobs as job_store
from storage.clock import utcnow
from storage.jobs import Runner

from ..api import Ctx, CurrentUser, authenticate, bearer_token
from ..auth.tokens import token_hash
from . import lifecycle

RUNNER_TOKEN_PREFIX = "zlhr_"

T = TypeVar("T")


def new_runner_token() -> str:
    return RUNNER_TOKEN_PREFIX + secrets.token_urlsafe(32)


def is_runner_token(token: str | None) -> bool:
    return token is not None and token.startswith(RUNNER_TOKEN_PREFIX)


async def as_runner(ctx: Ctx, action: Callable[[Runner], T]) -> T:
    """Authenticate the calling runner and run `action(runner)` in the same unit of work. Every
    runner call counts as a heartbeat: it extends the leases the runner holds."""
    token = bearer_token(ctx.headers)
    if not is_runner_token(token):
        raise ApiError(401, "UNAUTHORIZED", {"reason": "missing runner token"}, headers={"WWW-Authenticate": "Bearer"})
    assert token is not None
    hashed = token_hash(token)
    ttl = timedelta(seconds=ctx.services.settings.job_lease_ttl)

    def unit() -> T:
        now = utcnow()
        runner = job_store.touch_runner(hashed, now, now + ttl, lifecycle.LIVE)
        if runner is None:
            raise ApiError(401, "UNAUTHORIZED", {"reason": "unknown runner token"})
        return action(runner)

    return await job_store.run(ctx.services.store, unit)


async def runner_or_user(ctx: Ctx, action: Callable[[Runner | CurrentUser], T]) -> T:
    """For the routes runners and the UI share: either kind of caller."""
    if is_runner_token(bearer_token(ctx.headers)):
        return await as_runner(ctx, action)
    user = authenticate(ctx.services, ctx.headers)
    return await job_store.run(ctx.services.store, action, user)


def job_visible(caller: Any, job: Any) -> bool:
    """Operators see every job; a runner sees the jobs it holds or held."""
    return not isinstance(caller, Runner) or job.agent_id == caller.id
