"""Who is calling the job backend, and what they may see: a runner agent (per-runner bearer token,
stored hashed) or a user (a gateway access token). Runner tokens carry a fixed prefix so one header
serves both on the routes runners and the UI share. Never compares a plaintext token with anything
but its hash.

The ownership rule (the same as for every other object of the gateway, through
control.access.may_access): a project (with its pipelines and chains), a job (with its output,
artifacts and test results) and a vault connection belong to the user who created them; a regular
user sees and acts on only their own, an admin on all; anyone else gets the 404 of an object that
does not exist. A runner sees the jobs it holds or held. Runners are registered by admins; a regular
user sees only the runners an admin `shared`, in the reduced view `runner_view` gives."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from gateway.errors import ApiError
from storage import jobs as job_store
from storage.clock import utcnow
from storage.jobs import Runner

from ..access import may_access
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


def owns(user: CurrentUser, owner_id: int | None) -> bool:
    """Whether `user` may see and act on an object owned by `owner_id` (None: made before owners
    existed on a database without an admin; admins only)."""
    return may_access(user, owner_id) if owner_id is not None else user.is_admin


def owner_filter(user: CurrentUser) -> int | None:
    """The owner a listing is narrowed to: the caller, or nobody in particular for an admin."""
    return None if user.is_admin else user.id


def job_visible(caller: Runner | CurrentUser, job: Any) -> bool:
    """A runner sees the jobs it holds or held; a user the jobs they own (an admin every job)."""
    if isinstance(caller, Runner):
        return bool(job.agent_id == caller.id)
    return owns(caller, job.owner_id)


def runner_visible(user: CurrentUser, runner: Runner) -> bool:
    """Admins see every runner; a regular user only the shared ones (those that may run their jobs)."""
    return user.is_admin or bool(runner.shared)


def runners_for(user: CurrentUser) -> list[Runner]:
    """Inside a unit: the runners `user` may see, which are also the only ones their runs may use."""
    return job_store.list_runners(shared_only=not user.is_admin)


def needs_shared_runner(job_owner_id: int | None, admin_ids: set[int]) -> bool:
    """A job owned by a regular user may run only on a shared runner (NULL owner: an admin's)."""
    return job_owner_id is not None and job_owner_id not in admin_ids
