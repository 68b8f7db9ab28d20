"""Starting work: pipeline run-selection and chain run, their dry-run previews, eligible agents and
source refs. One planning function decides, for every entry point, which steps run, from which source
ref, in which execution mode, on which agents, and what blocks the run; a dry run answers the plan and
writes nothing; a run queues exactly what the plan shows.

`execution_mode: offline_cached` guardrails: the source ref must be pinned to a commit SHA (a branch
moves; a cache of it is not the source the operator asked for), and at least one active agent that
could take the job must report that project+SHA in its heartbeat's `cached_sources`; the lease then
gives such a job only to an agent that has it cached.

Ownership: only the owner of a pipeline's project (or an admin) may run, preview or ask about it; the
jobs a run queues belong to the caller. A regular user's plan considers only shared runners (the others
are not listed at all, and pinning one is the same "does not exist" as pinning an unknown id)."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any, Literal

import pydantic

from gateway.errors import ApiError
from storage import jobs as job_store
from storage.clock import utcnow
from storage.jobs import Pipeline, PipelineChain, Project, Runner, VaultConnection

from ..api import Body, Ctx
from . import lifecycle
from .access import owns, runners_for
from .eligibility import OFFLINE_CACHED, Demand, has_cached_source, reasons_against
from .present import job_json, runner_json
from .project_config import Name
from .sealing import SecretUnreadable
from .sources import SHA, Credentials, SourceUnavailable, list_refs
from .targets import Target
from .vault import checked_target, credentials_for, usable_connection


class ChainRunBody(Body):
    source_ref: pydantic.constr(min_length=1, max_length=255) | None = None  # type: ignore[valid-type]
    agent_id: pydantic.constr(min_length=1, max_length=40) | None = None  # type: ignore[valid-type]
    dry_run: bool = False
    offline_cached_only: bool = False
    execution_mode: Literal["standard", "offline_cached"] = "standard"


class RunBody(ChainRunBody):
    steps: list[Name] | None = pydantic.Field(default=None, min_length=1)  # type: ignore[valid-type]


def _agent_verdict(runner: Runner, demand: Demand, now: datetime, offline_after: float) -> dict[str, Any]:
    reasons = reasons_against(runner.id, runner.labels, runner.cached_sources, demand, shared=runner.shared)
    shown = runner_json(runner, now, offline_after)
    if not runner.active:
        reasons.append("agent is deactivated")
    if not shown["online"]:
        reasons.append("agent is offline")
    return {"id": runner.id, "name": runner.name, "status": shown["status"], "labels": runner.labels,
            "has_cached_source": has_cached_source(runner.cached_sources, demand.project, demand.source_ref),
            "eligible": not reasons, "reasons": reasons}


def plan(ctx: Ctx, project: Project, pipelines: list[Pipeline], body: ChainRunBody,
         steps: list[str] | None = None) -> dict[str, Any]:
    """Inside a unit: what a run with `body` would do. Pure reads."""
    settings = ctx.services.settings
    now = utcnow()
    source_ref = body.source_ref or project.default_ref
    offline = body.execution_mode == OFFLINE_CACHED
    runners = runners_for(ctx.me)
    blockers: list[str] = []
    warnings: list[str] = []
    if body.agent_id is not None and not any(r.id == body.agent_id for r in runners):
        blockers.append(f"agent {body.agent_id} does not exist")
    if offline and not SHA.match(source_ref):
        blockers.append("offline_cached requires source_ref pinned to a commit SHA")
    entries = []
    for pipeline in pipelines:
        selected = [s for s in pipeline.spec["steps"] if steps is None or s["name"] in steps]
        demand = Demand(project.name, tuple(pipeline.spec["labels"]), source_ref, body.agent_id,
                        offline or body.offline_cached_only, needs_shared_runner=not ctx.me.is_admin)
        verdicts = [_agent_verdict(r, demand, now, settings.runner_offline_after) for r in runners]
        if body.agent_id is not None:
            verdicts = [v for v in verdicts if v["id"] == body.agent_id]
        # Offline agents can still take the job later; deactivated or mismatched ones cannot.
        could_take = [v for v in verdicts if not [r for r in v["reasons"] if r != "agent is offline"]]
        if body.agent_id is not None and verdicts and not could_take:
            blockers.append(f"agent {body.agent_id} cannot run pipeline {pipeline.name}: "
                            + "; ".join(verdicts[0]["reasons"]))
        elif offline and not could_take:
            blockers.append(f"no active agent has {project.name}@{source_ref} cached for pipeline {pipeline.name}")
        elif not could_take:
            warnings.append(f"no agent can run pipeline {pipeline.name} now; the job will wait in the queue")
        entries.append({"id": pipeline.id, "name": pipeline.name, "steps": [s["name"] for s in selected],
                        "labels": pipeline.spec["labels"], "agents": verdicts,
                        "eligible_agents": [v["id"] for v in verdicts if v["eligible"]]})
    return {"dry_run": True, "project": {"id": project.id, "name": project.name}, "source_ref": source_ref,
            "execution_mode": body.execution_mode, "agent_id": body.agent_id,
            "offline_cached_only": body.offline_cached_only, "pipelines": entries, "blockers": blockers,
            "warnings": warnings, "would_queue": not blockers}


def _queue(ctx: Ctx, project: Project, pipelines: list[Pipeline], body: ChainRunBody, preview: dict[str, Any],
           chain: PipelineChain | None) -> list[dict[str, Any]]:
    if preview["blockers"]:
        raise ApiError(409, "RUN_BLOCKED", {"blockers": preview["blockers"]})
    chain_run = secrets.token_hex(8) if chain is not None else None
    upstream: int | None = None
    created = []
    for pipeline, entry in zip(pipelines, preview["pipelines"], strict=True):
        spec = pipeline.spec
        steps = [s for s in spec["steps"] if s["name"] in entry["steps"]]
        job = job_store.create_job(
            project_name=project.name, pipeline=pipeline.id, pipeline_name=pipeline.name, chain=chain,
            chain_run=chain_run, depends_on=upstream, status=lifecycle.QUEUED, pinned_agent_id=body.agent_id,
            labels=spec["labels"], steps=steps, env=spec["env"], source_ref=preview["source_ref"],
            execution_mode=body.execution_mode, timeout_seconds=spec["timeout_seconds"],
            max_attempts=spec.get("max_attempts") or ctx.services.settings.job_max_attempts,
            requested_by=ctx.me.id, owner_id=ctx.me.id)
        upstream = job.id
        created.append(job_json(job))
    return created


def pipeline_or_404(ctx: Ctx, pipeline_id: int) -> Pipeline:
    """Inside a unit: a pipeline of the caller's project (any for an admin), else a 404."""
    pipeline = job_store.pipeline_by_id(pipeline_id)
    if pipeline is None or not owns(ctx.me, pipeline.project.owner_id):
        raise ApiError(404, "PIPELINE_NOT_FOUND")
    return pipeline


def chain_or_404(ctx: Ctx, chain_id: int) -> tuple[PipelineChain, list[Pipeline]]:
    """Inside a unit: a chain of the caller's project (any for an admin) with its pipelines, else a 404."""
    chain = job_store.chain_by_id(chain_id)
    if chain is None or not owns(ctx.me, chain.project.owner_id):
        raise ApiError(404, "CHAIN_NOT_FOUND")
    pipelines = [job_store.pipeline_by_name(chain.project_id, name) for name in chain.pipelines]
    missing = [name for name, p in zip(chain.pipelines, pipelines, strict=True) if p is None]
    if missing:
        raise ApiError(409, "CHAIN_BROKEN", {"missing_pipelines": missing})
    return chain, [p for p in pipelines if p is not None]


def _check_steps(pipeline: Pipeline, steps: list[str] | None) -> None:
    known = {s["name"] for s in pipeline.spec["steps"]}
    problems = [{"field": f"steps.{i}", "message": f"pipeline {pipeline.name} has no step {name!r}",
                 "type": "reference"} for i, name in enumerate(steps or []) if name not in known]
    if problems:
        raise ApiError(422, "VALIDATION_FAILED", problems)


async def pipeline_run_selection(ctx: Ctx, pipeline_id: int) -> tuple[dict[str, Any], int]:
    body: RunBody = ctx.body

    def run() -> tuple[dict[str, Any], int]:
        pipeline = pipeline_or_404(ctx, pipeline_id)
        _check_steps(pipeline, body.steps)
        preview = plan(ctx, pipeline.project, [pipeline], body, body.steps)
        if body.dry_run:
            return preview, 200
        return {"dry_run": False, "jobs": _queue(ctx, pipeline.project, [pipeline], body, preview, None),
                "warnings": preview["warnings"]}, 201

    return await job_store.run(ctx.services.store, run)


async def pipeline_preview(ctx: Ctx, pipeline_id: int) -> dict[str, Any]:
    body: RunBody = ctx.body

    def preview() -> dict[str, Any]:
        pipeline = pipeline_or_404(ctx, pipeline_id)
        _check_steps(pipeline, body.steps)
        return plan(ctx, pipeline.project, [pipeline], body, body.steps)

    return await job_store.run(ctx.services.store, preview)


async def pipeline_eligible_agents(ctx: Ctx, pipeline_id: int) -> dict[str, Any]:
    body: ChainRunBody = ctx.body

    def eligible() -> dict[str, Any]:
        pipeline = pipeline_or_404(ctx, pipeline_id)
        entry = plan(ctx, pipeline.project, [pipeline], body)["pipelines"][0]
        return {"pipeline_id": pipeline.id, "agents": entry["agents"], "eligible_agents": entry["eligible_agents"]}

    return await job_store.run(ctx.services.store, eligible)


async def chain_run(ctx: Ctx, chain_id: int) -> tuple[dict[str, Any], int]:
    body: ChainRunBody = ctx.body

    def run() -> tuple[dict[str, Any], int]:
        chain, pipelines = chain_or_404(ctx, chain_id)
        preview = plan(ctx, chain.project, pipelines, body)
        preview["chain"] = {"id": chain.id, "name": chain.name}
        if body.dry_run:
            return preview, 200
        return {"dry_run": False, "chain": preview["chain"],
                "jobs": _queue(ctx, chain.project, pipelines, body, preview, chain),
                "warnings": preview["warnings"]}, 201

    return await job_store.run(ctx.services.store, run)


async def chain_preview(ctx: Ctx, chain_id: int) -> dict[str, Any]:
    body: ChainRunBody = ctx.body

    def preview() -> dict[str, Any]:
        chain, pipelines = chain_or_404(ctx, chain_id)
        return {**plan(ctx, chain.project, pipelines, body), "chain": {"id": chain.id, "name": chain.name}}

    return await job_store.run(ctx.services.store, preview)


async def chain_eligible_agents(ctx: Ctx, chain_id: int) -> dict[str, Any]:
    body: ChainRunBody = ctx.body

    def eligible() -> dict[str, Any]:
        chain, pipelines = chain_or_404(ctx, chain_id)
        entries = plan(ctx, chain.project, pipelines, body)["pipelines"]
        return {"chain_id": chain.id, "pipelines": [{"id": e["id"], "name": e["name"], "agents": e["agents"],
                                                     "eligible_agents": e["eligible_agents"]} for e in entries]}

    return await job_store.run(ctx.services.store, eligible)


def source_context(ctx: Ctx, project: Project) -> tuple[Project, VaultConnection | None, list[dict[str, Any]]]:
    """Inside a unit: the project, the vault connection it may use (None when it names none) and the
    source refs cached on the runners the caller may use."""
    row = None
    if project.vault_connection:
        row = usable_connection(project.vault_connection, project.owner_id)
        if row is None:
            raise ApiError(409, "VAULT_CONNECTION_MISSING", {"name": project.vault_connection})
    cached = sorted({entry["ref"] for r in runners_for(ctx.me) for entry in r.cached_sources
                     if entry.get("project") == project.name})
    return project, row, [{"ref": ref} for ref in cached]


async def source_target(ctx: Ctx, project: Project, row: VaultConnection | None) -> tuple[Target, Credentials | None]:
    """The project's repository checked again right before the call (its host may resolve elsewhere
    now), with the connection's credentials only if the repository is on the connection's origin."""
    target = await checked_target(ctx, project.repository or "", "project.repository")
    try:
        return target, credentials_for(ctx, target, row)
    except SecretUnreadable as exc:
        raise ApiError(409, "SECRET_UNREADABLE", {"name": project.vault_connection}) from exc


async def source_refs_of(ctx: Ctx, project: Project, row: VaultConnection | None,
                         cached: list[dict[str, Any]]) -> dict[str, Any]:
    refs = []
    if project.repository:
        target, credentials = await source_target(ctx, project, row)
        try:
            found = await list_refs(target, credentials, ctx.services.settings.source_timeout)
        except SourceUnavailable as exc:
            raise ApiError(502, "SOURCE_UNAVAILABLE", {"repository": project.repository, "reason": str(exc)}) from exc
        refs = [{"name": r.name, "ref": r.ref, "sha": r.sha, "kind": r.kind} for r in found]
    return {"project_id": project.id, "repository": project.repository, "default_ref": project.default_ref,
            "refs": refs, "cached": cached}


async def pipeline_source_refs(ctx: Ctx, pipeline_id: int) -> dict[str, Any]:
    def context() -> Any:
        return source_context(ctx, pipeline_or_404(ctx, pipeline_id).project)

    answer = await source_refs_of(ctx, *await job_store.run(ctx.services.store, context))
    return {"pipeline_id": pipeline_id, **answer}


async def chain_source_refs(ctx: Ctx, chain_id: int) -> dict[str, Any]:
    def context() -> Any:
        return source_context(ctx, chain_or_404(ctx, chain_id)[0].project)

    answer = await source_refs_of(ctx, *await job_store.run(ctx.services.store, context))
    return {"chain_id": chain_id, **answer}
