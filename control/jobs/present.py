"""The wire shapes of the job backend: how runners, jobs, artifacts, test results, projects,
pipelines and chains look in JSON (snake_case, as seed 003 names its fields; times ISO 8601 UTC).
Pure functions over storage rows; never reads or writes anything itself."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from storage.clock import isoformat
from storage.jobs import Job, JobArtifact, JobTestCase, Pipeline, PipelineChain, Project, Runner


def runner_json(runner: Runner, now: datetime, offline_after: float,
                current_jobs: list[int] | None = None) -> dict[str, Any]:
    seen = runner.last_heartbeat_at
    online = seen is not None and now - seen <= timedelta(seconds=offline_after)
    return {
        "id": runner.id,
        "name": runner.name,
        "labels": runner.labels,
        "shared": runner.shared,
        "owner_id": runner.owner_id,
        "active": runner.active,
        "online": online,
        "status": "deactivated" if not runner.active else ("online" if online else "offline"),
        "version": runner.version,
        "hostname": runner.hostname,
        "cached_sources": runner.cached_sources,
        "last_heartbeat_at": isoformat(seen),
        "deactivated_at": isoformat(runner.deactivated_at),
        "created_at": isoformat(runner.created_at),
        **({"current_jobs": current_jobs} if current_jobs is not None else {}),
    }


SHARED_RUNNER_FIELDS = ("id", "name", "labels", "shared", "active", "online", "status")


def shared_runner_json(runner: Runner, now: datetime, offline_after: float) -> dict[str, Any]:
    """What a regular user sees of a shared runner: enough to choose it, nothing of other tenants'
    work (no held jobs, no cached sources) and nothing of the host it runs on."""
    full = runner_json(runner, now, offline_after)
    return {key: full[key] for key in SHARED_RUNNER_FIELDS}


def job_json(job: Job, *, with_output: bool = True) -> dict[str, Any]:
    body = {
        "id": job.id,
        "project": job.project_name,
        "pipeline": job.pipeline_name,
        "pipeline_id": job.pipeline_id,
        "chain_id": job.chain_id,
        "chain_run": job.chain_run,
        "depends_on": job.depends_on,
        "status": job.status,
        "agent_id": job.agent_id,
        "pinned_agent_id": job.pinned_agent_id,
        "labels": job.labels,
        "steps": job.steps,
        "env": job.env,
        "source_ref": job.source_ref,
        "execution_mode": job.execution_mode,
        "timeout_seconds": job.timeout_seconds,
        "error": job.error,
        "exit_code": job.exit_code,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "lease_expires_at": isoformat(job.lease_expires_at),
        "rerun_of": job.rerun_of,
        "owner_id": job.owner_id,
        "created_at": isoformat(job.created_at),
        "leased_at": isoformat(job.leased_at),
        "started_at": isoformat(job.started_at),
        "finished_at": isoformat(job.finished_at),
    }
    if with_output:
        body["output"] = job.output
    return body


def artifact_json(artifact: JobArtifact) -> dict[str, Any]:
    return {
        "name": artifact.name,
        "size": artifact.size,
        "sha256": artifact.sha256,
        "created_at": isoformat(artifact.created_at),
        "download": f"/api/v1/jobs/{artifact.job_id}/artifacts/{artifact.name}",
    }


def test_report_json(job_id: int, cases: list[JobTestCase]) -> dict[str, Any]:
    summary = {"total": len(cases), "passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for case in cases:
        summary[case.status] += 1
    return {
        "job_id": job_id,
        "summary": summary,
        "cases": [{"suite": c.suite, "name": c.name, "status": c.status, "duration_ms": c.duration_ms,
                   "message": c.message} for c in cases],
    }


def pipeline_json(pipeline: Pipeline) -> dict[str, Any]:
    return {"id": pipeline.id, "project_id": pipeline.project_id, "name": pipeline.name, **pipeline.spec}


def chain_json(chain: PipelineChain) -> dict[str, Any]:
    return {"id": chain.id, "project_id": chain.project_id, "name": chain.name, "pipelines": chain.pipelines}


def project_json(project: Project, pipelines: list[Pipeline] | None = None,
                 chains: list[PipelineChain] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": project.id,
        "name": project.name,
        "owner_id": project.owner_id,
        "description": project.description,
        "repository": project.repository,
        "default_ref": project.default_ref,
        "vault_connection": project.vault_connection,
        "has_icon": project.icon is not None,
        "source": "path" if project.source_path else "inline",
        "created_at": isoformat(project.created_at),
        "loaded_at": isoformat(project.loaded_at),
    }
    if pipelines is not None:
        body["pipelines"] = [pipeline_json(p) for p in pipelines]
    if chains is not None:
        body["chains"] = [chain_json(c) for c in chains]
    return body
