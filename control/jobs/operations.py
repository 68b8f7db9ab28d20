"""Operator routes over runners and jobs: register/list/get agents, activate or deactivate them and
share them with regular users or not; list, read, delete, cancel and rerun jobs; clear the queue; flush
finished history; read test results.

Ownership (access.py): a user acts only on their own jobs (an admin on all); another tenant's job is a
404. A rerun is a new job owned by the caller. Clear-queue and flush-history by a regular user act on
that user's own jobs only; by an admin on every job.

Cancel and deactivate-while-running apply the one terminal mutation the seed prescribes
(`status=failed`, `error="cancelled by user"`, `[control] job cancelled by user` appended to output),
through the transition table, never by writing a state directly."""

from __future__ import annotations

import secrets
from typing import Any, Literal

import pydantic
import trio

from gateway.errors import ApiError
from storage import jobs as job_store
from storage.clock import utcnow
from storage.jobs import Runner

from ..api import Body, Ctx, CurrentUser, query_int
from ..auth.tokens import token_hash
from . import lifecycle
from .access import (
    job_visible,
    new_runner_token,
    owner_filter,
    owns,
    runner_or_user,
    runner_visible,
    runners_for,
)
from .artifacts import remove_job_files
from .present import job_json, runner_json, shared_runner_json, test_report_json

Name = pydantic.constr(min_length=1, max_length=128)


class CreateAgentBody(Body):
    name: Name  # type: ignore[valid-type]
    labels: list[Name] = pydantic.Field(default_factory=list, max_length=64)  # type: ignore[valid-type]
    shared: bool = pydantic.Field(default=False, description=(
        "Whether the runner may lease regular users' jobs. A runner that is not shared runs only jobs "
        "owned by admins; change it later with the actions route (share / unshare)."))


class AgentActionBody(Body):
    action: Literal["activate", "deactivate", "share", "unshare"]


def _agent_json(ctx: Ctx, runner: Runner) -> dict[str, Any]:
    if not ctx.me.is_admin:
        return shared_runner_json(runner, utcnow(), ctx.services.settings.runner_offline_after)
    held = [job.id for job in job_store.jobs_held_by(runner.id, lifecycle.LIVE)]
    return runner_json(runner, utcnow(), ctx.services.settings.runner_offline_after, held)


async def create_agent(ctx: Ctx) -> tuple[dict[str, Any], int]:
    """Register a runner; its token is answered once, here, and kept only as a hash."""
    body: CreateAgentBody = ctx.body
    token = new_runner_token()
    runner_id = "agt_" + secrets.token_hex(8)

    def create() -> dict[str, Any]:
        runner = job_store.create_runner(runner_id, body.name, token_hash(token), list(body.labels),
                                         owner_id=ctx.me.id, shared=body.shared)
        return _agent_json(ctx, runner)

    agent = await job_store.run(ctx.services.store, create)
    return {"agent": agent, "token": token}, 201


async def list_agents(ctx: Ctx) -> dict[str, Any]:
    def listing() -> list[dict[str, Any]]:
        return [_agent_json(ctx, runner) for runner in runners_for(ctx.me)]

    return {"agents": await job_store.run(ctx.services.store, listing)}


async def get_agent(ctx: Ctx, agent_id: str) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        runner = job_store.runner_by_id(agent_id)
        if runner is None or not runner_visible(ctx.me, runner):
            raise ApiError(404, "AGENT_NOT_FOUND")
        return _agent_json(ctx, runner)

    return await job_store.run(ctx.services.store, read)


def cancel_in_unit(job_id: int) -> bool:
    """The seed's cancel mutation on one job, inside a unit; False when the job is not live or queued."""
    return job_store.transition_job(
        job_id, lifecycle.sources("cancel"), lifecycle.target("cancel"), error=lifecycle.CANCEL_ERROR,
        finished_at=utcnow(), lease_expires_at=None, append_line=lifecycle.CANCEL_NOTE + "\n")


async def agent_action(ctx: Ctx, agent_id: str) -> dict[str, Any]:
    """activate / deactivate (the seed's semantics) and share / unshare. Unsharing affects later leases
    only: a regular user's job the runner already holds runs to its end."""
    body: AgentActionBody = ctx.body
    active = body.action == "activate"

    def act() -> dict[str, Any]:
        if body.action in ("share", "unshare"):
            changed = job_store.set_runner_shared(agent_id, body.action == "share")
        else:
            changed = job_store.set_runner_active(agent_id, active, utcnow())
        if not changed:
            raise ApiError(404, "AGENT_NOT_FOUND")
        cancelled = []
        if body.action == "deactivate":
            for job in job_store.jobs_held_by(agent_id, lifecycle.LIVE):
                if cancel_in_unit(job.id):
                    cancelled.append(job.id)
        runner = job_store.runner_by_id(agent_id)
        assert runner is not None
        return {"agent": _agent_json(ctx, runner), "action": body.action, "cancelled_jobs": cancelled}

    return await job_store.run(ctx.services.store, act)


async def list_jobs(ctx: Ctx) -> dict[str, Any]:
    status = ctx.query.get("status")
    if status is not None and status not in lifecycle.STATES:
        raise ApiError(422, "VALIDATION_FAILED", [{"field": "status", "message": f"one of {list(lifecycle.STATES)}",
                                                   "type": "enum"}])
    limit = query_int(ctx, "limit", 50, 1, 500)
    offset = query_int(ctx, "offset", 0, 0, 10**9)
    pipeline_id = query_int(ctx, "pipeline_id", 0) or None

    def listing() -> dict[str, Any]:
        rows, total = job_store.list_jobs(status=status, agent_id=ctx.query.get("agent_id"),
                                          pipeline_id=pipeline_id, limit=limit, offset=offset,
                                          owner_id=owner_filter(ctx.me))
        return {"jobs": [job_json(job, with_output=False) for job in rows], "total": total,
                "limit": limit, "offset": offset}

    return await job_store.run(ctx.services.store, listing)



async def get_job(ctx: Ctx, job_id: int) -> dict[str, Any]:
    def read(caller: Runner | CurrentUser) -> dict[str, Any]:
        job = job_store.job_by_id(job_id)
        if job is None or not job_visible(caller, job):
            raise ApiError(404, "JOB_NOT_FOUND")
        return job_json(job)

    return await runner_or_user(ctx, read)


def _illegal(job: Any, event: str) -> ApiError:
    try:
        lifecycle.advance(job.status, event)
    except lifecycle.IllegalTransition as exc:
        return ApiError(409, "ILLEGAL_TRANSITION", {"job_id": job.id, "status": job.status, "reason": str(exc)})
    return ApiError(409, "CONFLICT", {"job_id": job.id, "status": job.status, "reason": "job changed concurrently"})


def owned_job_or_404(ctx: Ctx, job_id: int) -> Any:
    """Inside a unit: the caller's job (any job for an admin), else the 404 of a job that does not exist."""
    job = job_store.job_by_id(job_id)
    if job is None or not owns(ctx.me, job.owner_id):
        raise ApiError(404, "JOB_NOT_FOUND")
    return job


async def cancel_job(ctx: Ctx, job_id: int) -> dict[str, Any]:
    def cancel() -> dict[str, Any]:
        owned_job_or_404(ctx, job_id)
        changed = cancel_in_unit(job_id)
        job = owned_job_or_404(ctx, job_id)
        if not changed:
            raise _illegal(job, "cancel")
        return job_json(job)

    return await job_store.run(ctx.services.store, cancel)


async def rerun_job(ctx: Ctx, job_id: int) -> tuple[dict[str, Any], int]:
    """A new queued job with the same definition, owned by the caller; the old one stays as history.
    Only the job's owner (or an admin) may rerun it."""
    def rerun() -> dict[str, Any]:
        job = owned_job_or_404(ctx, job_id)
        if job.status not in lifecycle.TERMINAL:
            raise ApiError(409, "JOB_NOT_FINISHED", {"job_id": job.id, "status": job.status})
        fresh = job_store.create_job(
            project_name=job.project_name, pipeline=job.pipeline_id, pipeline_name=job.pipeline_name,
            chain=job.chain_id, status=lifecycle.QUEUED, pinned_agent_id=job.pinned_agent_id, labels=job.labels,
            steps=job.steps, env=job.env, source_ref=job.source_ref, execution_mode=job.execution_mode,
            timeout_seconds=job.timeout_seconds, max_attempts=job.max_attempts, rerun_of=job.id,
            requested_by=ctx.me.id, owner_id=ctx.me.id)
        return job_json(fresh)

    return await job_store.run(ctx.services.store, rerun), 201


async def delete_job(ctx: Ctx, job_id: int) -> None:
    def delete() -> None:
        owned_job_or_404(ctx, job_id)
        if job_store.delete_job(job_id, lifecycle.TERMINAL):
            return
        job = owned_job_or_404(ctx, job_id)
        raise ApiError(409, "JOB_NOT_FINISHED", {"job_id": job.id, "status": job.status,
                                                 "reason": "cancel it first"})

    await job_store.run(ctx.services.store, delete)
    await trio.to_thread.run_sync(remove_job_files, ctx.services, [job_id])


async def clear_queue(ctx: Ctx) -> dict[str, Any]:
    """Cancel every queued job of the caller (an admin: every queued job)."""
    count = await job_store.run(ctx.services.store, job_store.clear_queue, lifecycle.QUEUED,
                                lifecycle.advance(lifecycle.QUEUED, "clear"), utcnow(), "queue cleared",
                                owner_filter(ctx.me))
    return {"cleared": count}


async def flush_history(ctx: Ctx) -> dict[str, Any]:
    """Delete the caller's finished jobs (an admin: every finished job) and their artifacts."""
    deleted = await job_store.run(ctx.services.store, job_store.flush_history, lifecycle.TERMINAL,
                                  owner_filter(ctx.me))
    await trio.to_thread.run_sync(remove_job_files, ctx.services, deleted)
    return {"deleted": len(deleted)}


async def job_tests(ctx: Ctx, job_id: int) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        job = owned_job_or_404(ctx, job_id)
        return test_report_json(job.id, job_store.list_test_cases(job.id))

    return await job_store.run(ctx.services.store, read)
