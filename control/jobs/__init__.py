"""The job backend (seed 003): runner agents lease jobs, report status, stream artifacts and test
results; operators manage agents, jobs, projects, pipelines and chains, the vault and the gateway's
own releases. `routes()` lists every route of the family (mounted by control/app.py);
`background_services()` lists the services this family runs in the gateway's nursery.

Auth: runner routes take a per-runner token (access.py); `GET /api/v1/jobs/{id}` and its artifacts
take either a runner token or an access token; everything else an access token, admin where marked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..api import Route
from ..services import Services
from . import artifacts, info, operations, projects, protocol, runs, updates, vault, version_stream
from .reaper import lease_reaper

RUNNER = None  # authenticated by the handler with a runner token
ADMIN = "admin"
ANY = None  # runner token or access token, checked by the handler
TAGS = ("jobs",)

_RAW_UPLOAD = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}, "parameters": [
    {"name": "name", "in": "query", "required": True, "schema": {"type": "string"}}]}
_SSE = {"responses": {"200": {"description": "Server-Sent Events", "content": {"text/event-stream": {}}}}}


def routes() -> list[Route]:
    J = "/api/v1"
    return [
        # Installer and UI state
        Route("GET", "/healthz", info.healthz, "Liveness plus database reachability", auth=None, tags=TAGS),
        Route("GET", f"{J}/runtime-state", info.runtime_state, "Agents, queue and release at a glance", tags=TAGS),
        Route("GET", f"{J}/server-info", info.server_info, "What this gateway is and speaks", auth=None, tags=TAGS),
        # Runner protocol
        Route("POST", f"{J}/heartbeat", protocol.heartbeat, "Runner heartbeat: extends its leases, lists jobs to stop",
              auth=RUNNER, body=protocol.HeartbeatBody, tags=TAGS),
        Route("POST", f"{J}/agent/lease", protocol.lease, "Lease the next eligible job (assigned=false when none)",
              auth=RUNNER, response=protocol.LEASE_SCHEMA, tags=TAGS),
        Route("POST", f"{J}/jobs/<int:job_id>/status", protocol.report_status,
              "Runner status report: running/done/failed, output appended", auth=RUNNER, body=protocol.StatusBody,
              tags=TAGS),
        Route("POST", f"{J}/jobs/<int:job_id>/artifacts", None,
              "Stream one artifact (raw body, ?name=) to disk", auth=RUNNER, status=201, data_plane=True,
              tags=TAGS, extra_doc=_RAW_UPLOAD),
        Route("POST", f"{J}/jobs/<int:job_id>/tests", protocol.report_tests, "Record structured test results",
              auth=RUNNER, body=protocol.TestReportBody, status=201, tags=TAGS),
        # Shared by runners and the UI
        Route("GET", f"{J}/jobs/<int:job_id>", operations.get_job, "One job with its output", auth=ANY, tags=TAGS),
        Route("GET", f"{J}/jobs/<int:job_id>/artifacts", artifacts.list_artifacts, "A job's artifacts", auth=ANY,
              tags=TAGS),
        Route("GET", f"{J}/jobs/<int:job_id>/artifacts/<name>", artifacts.download_artifact,
              "Download one artifact (streamed)", auth=ANY, tags=TAGS, content_type="application/octet-stream"),
        # Agents
        Route("POST", f"{J}/agents", operations.create_agent, "Register a runner; its token is shown once",
              auth=ADMIN, body=operations.CreateAgentBody, status=201, tags=TAGS),
        Route("GET", f"{J}/agents", operations.list_agents, "Every runner agent", tags=TAGS),
        Route("GET", f"{J}/agents/<agent_id>", operations.get_agent, "One runner agent", tags=TAGS),
        Route("POST", f"{J}/agents/<agent_id>/actions", operations.agent_action,
              "activate / deactivate (deactivating cancels its live jobs)", auth=ADMIN,
              body=operations.AgentActionBody, tags=TAGS),
        # Jobs (the static paths before /jobs/<id>)
        Route("GET", f"{J}/jobs", operations.list_jobs, "Jobs, newest first (?status=&agent_id=&pipeline_id=)",
              tags=TAGS),
        Route("POST", f"{J}/jobs/clear-queue", operations.clear_queue, "Cancel every queued job", auth=ADMIN,
              tags=TAGS),
        Route("POST", f"{J}/jobs/flush-history", operations.flush_history,
              "Delete every finished job and its artifacts", auth=ADMIN, tags=TAGS),
        Route("DELETE", f"{J}/jobs/<int:job_id>", operations.delete_job, "Delete a finished job", status=204,
              tags=TAGS),
        Route("POST", f"{J}/jobs/<int:job_id>/cancel", operations.cancel_job,
              "Cancel: status=failed, error=cancelled by user", tags=TAGS),
        Route("POST", f"{J}/jobs/<int:job_id>/rerun", operations.rerun_job, "Queue a new job like a finished one",
              status=201, tags=TAGS),
        Route("GET", f"{J}/jobs/<int:job_id>/tests", operations.job_tests, "A job's test results with a summary",
              tags=TAGS),
        # Projects
        Route("GET", f"{J}/projects", projects.list_projects, "Every project with its pipelines and chains",
              tags=TAGS),
        Route("POST", f"{J}/projects/import", projects.import_project,
              "Import a project from strictly validated YAML (inline, or a file path for admins)",
              body=projects.ImportBody, status=201, tags=TAGS),
        Route("GET", f"{J}/projects/<int:project_id>", projects.get_project, "One project", tags=TAGS),
        Route("DELETE", f"{J}/projects/<int:project_id>", projects.delete_project, "Delete a project", status=204,
              tags=TAGS),
        Route("GET", f"{J}/projects/<int:project_id>/icon", projects.project_icon, "The project's icon", tags=TAGS,
              content_type="image/*"),
        Route("POST", f"{J}/projects/<int:project_id>/reload", projects.reload_project,
              "Re-read and re-validate the project's YAML", tags=TAGS),
        # Pipelines
        Route("POST", f"{J}/pipelines/<int:pipeline_id>/run-selection", runs.pipeline_run_selection,
              "Run a pipeline (optionally a selection of steps)", body=runs.RunBody, status=201, tags=TAGS),
        Route("POST", f"{J}/pipelines/<int:pipeline_id>/dry-run-preview", runs.pipeline_preview,
              "What a run would do; writes nothing", body=runs.RunBody, tags=TAGS),
        Route("GET", f"{J}/pipelines/<int:pipeline_id>/source-refs", runs.pipeline_source_refs,
              "Branches and tags of the pipeline's repository", tags=TAGS),
        Route("POST", f"{J}/pipelines/<int:pipeline_id>/eligible-agents", runs.pipeline_eligible_agents,
              "Which agents could run the pipeline, and why not", body=runs.ChainRunBody, tags=TAGS),
        Route("GET", f"{J}/pipelines/<int:pipeline_id>/version-resolve", version_stream.version_resolve,
              "Resolve a source ref to commit and version (Server-Sent Events)", tags=TAGS, extra_doc=_SSE),
        # Pipeline chains
        Route("POST", f"{J}/pipeline-chains/<int:chain_id>/run", runs.chain_run,
              "Run every pipeline of a chain in order", body=runs.ChainRunBody, status=201, tags=TAGS),
        Route("POST", f"{J}/pipeline-chains/<int:chain_id>/dry-run-preview", runs.chain_preview,
              "What a chain run would do; writes nothing", body=runs.ChainRunBody, tags=TAGS),
        Route("GET", f"{J}/pipeline-chains/<int:chain_id>/source-refs", runs.chain_source_refs,
              "Branches and tags of the chain's repository", tags=TAGS),
        Route("POST", f"{J}/pipeline-chains/<int:chain_id>/eligible-agents", runs.chain_eligible_agents,
              "Eligible agents per pipeline of the chain", body=runs.ChainRunBody, tags=TAGS),
        # Vault
        Route("GET", f"{J}/vault/connections", vault.list_connections, "Vault connections (never secrets)",
              auth=ADMIN, tags=TAGS),
        Route("POST", f"{J}/vault/connections", vault.create_connection, "Add a connection; its secret is sealed",
              auth=ADMIN, body=vault.CreateConnectionBody, status=201, tags=TAGS),
        Route("DELETE", f"{J}/vault/connections/<int:connection_id>", vault.delete_connection, "Delete a connection",
              auth=ADMIN, status=204, tags=TAGS),
        Route("POST", f"{J}/vault/connections/<int:connection_id>/test", vault.test_connection,
              "Prove a connection works with a real call", auth=ADMIN, tags=TAGS),
        # The gateway's own release
        Route("POST", f"{J}/update/check", updates.update_check, "Compare the current release with the feed",
              auth=ADMIN, tags=TAGS),
        Route("POST", f"{J}/update/apply", updates.update_apply, "Stage and switch to a release (dry_run to preview)",
              auth=ADMIN, body=updates.ApplyBody, tags=TAGS),
        Route("POST", f"{J}/update/rollback", updates.update_rollback, "Switch back to the previous release",
              auth=ADMIN, body=updates.DryRunBody, tags=TAGS),
        Route("GET", f"{J}/update/tags", updates.update_tags, "Releases in the feed", auth=ADMIN, tags=TAGS),
        Route("GET", f"{J}/update/status", updates.update_status, "Running, current, previous and staged releases",
              auth=ADMIN, tags=TAGS),
        Route("POST", f"{J}/server/restart", updates.server_restart, "Graceful restart (dry_run to preview)",
              auth=ADMIN, body=updates.DryRunBody, tags=TAGS),
    ]


def background_services(services: Services) -> list[Callable[..., Any]]:
    return [lease_reaper(services), updates.restart_service(services)]
