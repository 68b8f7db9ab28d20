"""The runner protocol: heartbeat, lease, status reports and structured test results. Runners
authenticate with their own token (see access.py); every call is also a heartbeat.

A runner learns that a job was taken from it (cancelled, or re-queued after its lease lapsed) from
structured answers only: the heartbeat lists `cancel_jobs`, and a status report on a job it no longer
holds answers 409 LEASE_LOST with the job's status. Never from scraping output."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import pydantic

from gateway.errors import ApiError
from storage import jobs as job_store
from storage.clock import utcnow
from storage.jobs import Runner

from ..api import Body, Ctx
from . import lifecycle
from .access import as_runner, needs_shared_runner
from .eligibility import OFFLINE_CACHED, Demand, reasons_against
from .present import job_json, runner_json

DEACTIVATED_MESSAGE = "agent is deactivated"
NO_JOB_MESSAGE = "no job available"

Name = pydantic.constr(min_length=1, max_length=128)


class CachedSource(Body):
    project: Name  # type: ignore[valid-type]
    ref: pydantic.constr(min_length=1, max_length=255)  # type: ignore[valid-type]


class HeartbeatBody(Body):
    version: pydantic.constr(max_length=64) | None = None  # type: ignore[valid-type]
    hostname: pydantic.constr(max_length=255) | None = None  # type: ignore[valid-type]
    labels: list[Name] | None = pydantic.Field(default=None, max_length=64)  # type: ignore[valid-type]
    cached_sources: list[CachedSource] = pydantic.Field(default_factory=list, max_length=1000)
    running_jobs: list[int] = pydantic.Field(default_factory=list, max_length=1000)


class StatusBody(Body):
    status: Literal["running", "done", "failed"]
    output: pydantic.constr(max_length=1024 * 1024) = ""  # type: ignore[valid-type]  # appended to the job's output
    exit_code: int | None = None
    error: pydantic.constr(max_length=4096) | None = None  # type: ignore[valid-type]


class TestCaseBody(Body):
    name: pydantic.constr(min_length=1, max_length=512)  # type: ignore[valid-type]
    status: Literal["passed", "failed", "skipped", "error"]
    duration_ms: float | None = pydantic.Field(default=None, ge=0)
    message: pydantic.constr(max_length=65536) | None = None  # type: ignore[valid-type]


class TestReportBody(Body):
    suite: pydantic.constr(min_length=1, max_length=255)  # type: ignore[valid-type]
    cases: list[TestCaseBody] = pydantic.Field(min_length=1, max_length=10000)


LEASE_SCHEMA = {"type": "object", "required": ["assigned"], "properties": {
    "assigned": {"type": "boolean"}, "message": {"type": "string"}, "job": {"type": "object"},
    "lease_ttl": {"type": "number"}}}


async def heartbeat(ctx: Ctx) -> dict[str, Any]:
    body: HeartbeatBody = ctx.body
    settings = ctx.services.settings

    def beat(runner: Runner) -> dict[str, Any]:
        updated = job_store.record_heartbeat(
            runner.id, version=body.version, hostname=body.hostname, labels=body.labels,
            cached_sources=[source.model_dump() for source in body.cached_sources])
        held = {job.id for job in job_store.jobs_held_by(runner.id, lifecycle.LIVE)}
        current = sorted(held)
        return {"agent": runner_json(updated, utcnow(), settings.runner_offline_after, current),
                "cancel_jobs": sorted(set(body.running_jobs) - held), "lease_ttl": settings.job_lease_ttl}

    return await as_runner(ctx, beat)


async def lease(ctx: Ctx) -> dict[str, Any]:
    settings = ctx.services.settings

    def claim(runner: Runner) -> dict[str, Any]:
        if not runner.active:
            return {"assigned": False, "message": DEACTIVATED_MESSAGE}
        now = utcnow()
        lease_until = now + timedelta(seconds=settings.job_lease_ttl)
        admins = job_store.user_ids_with_role("admin")
        # A runner that is not shared never even considers a regular user's job (reasons_against says
        # the same for previews); narrowing the query keeps such jobs from crowding out its own.
        candidates = job_store.lease_candidates(lifecycle.QUEUED, lifecycle.DONE,
                                                owners=None if runner.shared else admins)
        for job in candidates:
            demand = Demand(job.project_name, tuple(job.labels), job.source_ref, job.pinned_agent_id,
                            job.execution_mode == OFFLINE_CACHED, needs_shared_runner(job.owner_id, admins))
            if reasons_against(runner.id, runner.labels, runner.cached_sources, demand, shared=runner.shared):
                continue
            if job_store.claim_job(job.id, runner.id, queued=lifecycle.QUEUED,
                                   leased=lifecycle.advance(lifecycle.QUEUED, "lease"),
                                   now=now, lease_until=lease_until):
                claimed = job_store.job_by_id(job.id)
                assert claimed is not None
                return {"assigned": True, "job": job_json(claimed), "lease_ttl": settings.job_lease_ttl}
        return {"assigned": False, "message": NO_JOB_MESSAGE}

    return await as_runner(ctx, claim)


def lease_lost(job: Any) -> ApiError:
    return ApiError(409, "LEASE_LOST", {"job_id": job.id, "status": job.status, "error": job.error})


async def report_status(ctx: Ctx, job_id: int) -> dict[str, Any]:
    body: StatusBody = ctx.body

    def report(runner: Runner) -> dict[str, Any]:
        job = job_store.job_by_id(job_id)
        if job is None:
            raise ApiError(404, "JOB_NOT_FOUND")
        if job.agent_id != runner.id or job.status not in lifecycle.LIVE:
            raise lease_lost(job)
        if body.status == job.status == lifecycle.RUNNING:
            job_store.append_job_output(job.id, runner.id, lifecycle.LIVE, body.output)
        else:
            try:
                new_state = lifecycle.advance(job.status, lifecycle.REPORTED_EVENTS[body.status])
            except lifecycle.IllegalTransition as exc:
                raise ApiError(409, "ILLEGAL_TRANSITION", {"status": job.status, "reported": body.status,
                                                           "reason": str(exc)}) from exc
            now = utcnow()
            fields: dict[str, Any] = {}
            if new_state == lifecycle.RUNNING:
                fields["started_at"] = now
            else:
                fields.update(finished_at=now, lease_expires_at=None, exit_code=body.exit_code,
                              error=body.error if new_state == lifecycle.FAILED else None)
            if not job_store.transition_job(job.id, [job.status], new_state, held_by=runner.id,
                                            append_output=body.output or None, **fields):
                raise lease_lost(job)
        updated = job_store.job_by_id(job.id)
        assert updated is not None
        return job_json(updated, with_output=False)

    return await as_runner(ctx, report)


async def report_tests(ctx: Ctx, job_id: int) -> tuple[dict[str, Any], int]:
    body: TestReportBody = ctx.body

    def record(runner: Runner) -> dict[str, Any]:
        job = job_store.job_by_id(job_id)
        if job is None:
            raise ApiError(404, "JOB_NOT_FOUND")
        if job.agent_id != runner.id or job.status not in lifecycle.LIVE:
            raise lease_lost(job)
        count = job_store.add_test_cases(job.id, body.suite, [case.model_dump() for case in body.cases])
        return {"job_id": job.id, "suite": body.suite, "recorded": count}

    return await as_runner(ctx, record), 201
