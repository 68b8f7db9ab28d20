"""The job backend (seed 003): runner agents lease jobs, report status, stream artifacts and test
results; operators manage agents, jobs, projects, pipelines and chains, the vault and the gateway's
own releases. `routes()` lists every route of the family (mounted by control/app.py);
`background_services()` lists the services this family runs in the gateway's nursery.

Auth: runner routes take a per-runner token (access.py); `GET /api/v1/jobs/{id}` and its artifacts
take either a runner token or an access token; everything else an access token, admin where marked.

Ownership (access.py, stated once here and in every user route's OpenAPI description): projects with
their pipelines and chains, jobs with their output, artifacts and test results, and vault connections
belong to the user who created them. A regular user lists and acts on only their own; an admin on all;
another tenant's object answers the same 404 as one that does not exist. Runners are registered by
admins; a runner leases admins' jobs, and regular users' jobs only when it is `shared`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..api import Handler, Route
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
OWNERSHIP = ("Ownership: projects (with pipelines and chains), jobs (with output, artifacts and test results) and "
             "vault connections belong to the user who created them. A regular user sees and acts on only their own, "
             "an admin on all; another tenant's object answers 404 as if it did not exist.")
REPOSITORY_RULE = ("A repository (or connection URL) must be a remote https://, ssh:// or scp-style git URL whose host "
                   "resolves only to public addresses; anything else is a 400 SOURCE_REFUSED naming the field, unless "
                   "the operator allows it with ZLH_JOBS_ALLOWED_SOURCES (CIDRs, where plain http:// is accepted too, "
                   "and/or `local`).")
VAULT_RULE = ("A connection is usable only by projects of its owner (an admin's by admins' projects), and its secret "
              "is sent only to the scheme, host and port of its own URL; secrets are never returned.")
SHARED = ("Runners are registered by admins. A runner leases jobs owned by admins, and jobs of regular users only "
          "when it is shared (`shared: true` at registration, or the share / unshare actions); a regular user sees "
          "only shared runners, in a reduced view.")


def _doc(description: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, **(extra or {})}


def _user_route(method: str, path: str, handler: Handler | None, summary: str, *, rule: str = OWNERSHIP,
                extra_doc: dict[str, Any] | None = None, **kwargs: Any) -> Route:
    """A route whose OpenAPI description states the rule it follows (ownership, or runner sharing)."""
    return Route(method, path, handler, summary, tags=TAGS, extra_doc=_doc(rule, extra_doc), **kwargs)


def routes() -> list[Route]:
    J = "/api/v1"
    U = _user_route
    return [
        # Installer and UI state
        Route("GET", "/healthz", info.healthz, "Liveness plus database reachability", auth=None, tags=TAGS),
        U("GET", f"{J}/runtime-state", info.runtime_state,
          "Agents, queue and release at a glance (a regular user: own jobs, shared runners)"),
        Route("GET", f"{J}/server-info", info.server_info, "What this gateway is and speaks", auth=None, tags=TAGS),
        # Runner protocol
        Route("POST", f"{J}/heartbeat", protocol.heartbeat, "Runner heartbeat: extends its leases, lists jobs to stop",
              auth=RUNNER, body=protocol.HeartbeatBody, tags=TAGS),
        U("POST", f"{J}/agent/lease", protocol.lease, "Lease the next eligible job (assigned=false when none)",
          rule=SHARED, auth=RUNNER, response=protocol.LEASE_SCHEMA),
        Route("POST", f"{J}/jobs/<int:job_id>/status", protocol.report_status,
              "Runner status report: running/done/failed, output appended", auth=RUNNER, body=protocol.StatusBody,
              tags=TAGS),
        Route("POST", f"{J}/jobs/<int:job_id>/artifacts", None,
              "Stream one artifact (raw body, ?name=) to disk", auth=RUNNER, status=201, data_plane=True,
              tags=TAGS, extra_doc=_RAW_UPLOAD),
        Route("POST", f"{J}/jobs/<int:job_id>/tests", protocol.report_tests, "Record structured test results",
              auth=RUNNER, body=protocol.TestReportBody, status=201, tags=TAGS),
        # Shared by runners and the UI (a runner: the jobs it holds or held; a user: their own)
        U("GET", f"{J}/jobs/<int:job_id>", operations.get_job, "One job with its output", auth=ANY),
        U("GET", f"{J}/jobs/<int:job_id>/artifacts", artifacts.list_artifacts, "A job's artifacts", auth=ANY),
        U("GET", f"{J}/jobs/<int:job_id>/artifacts/<name>", artifacts.download_artifact,
          "Download one artifact (streamed)", auth=ANY, content_type="application/octet-stream"),
        # Agents
        U("POST", f"{J}/agents", operations.create_agent, "Register a runner (shared or not); its token is shown once",
          rule=SHARED, auth=ADMIN, body=operations.CreateAgentBody, status=201),
        U("GET", f"{J}/agents", operations.list_agents, "Runner agents (a regular user: the shared ones)", rule=SHARED),
        U("GET", f"{J}/agents/<agent_id>", operations.get_agent, "One runner agent", rule=SHARED),
        U("POST", f"{J}/agents/<agent_id>/actions", operations.agent_action,
          "activate / deactivate (deactivating cancels its live jobs), share / unshare", rule=SHARED, auth=ADMIN,
          body=operations.AgentActionBody),
        # Jobs (the static paths before /jobs/<id>)
        U("GET", f"{J}/jobs", operations.list_jobs, "Jobs, newest first (?status=&agent_id=&pipeline_id=)"),
        U("POST", f"{J}/jobs/clear-queue", operations.clear_queue,
          "Cancel every queued job (a regular user: their own)"),
        U("POST", f"{J}/jobs/flush-history", operations.flush_history,
          "Delete every finished job and its artifacts (a regular user: their own)"),
        U("DELETE", f"{J}/jobs/<int:job_id>", operations.delete_job, "Delete a finished job", status=204),
        U("POST", f"{J}/jobs/<int:job_id>/cancel", operations.cancel_job,
          "Cancel: status=failed, error=cancelled by user"),
        U("POST", f"{J}/jobs/<int:job_id>/rerun", operations.rerun_job,
          "Queue a new job like a finished one, owned by the caller", status=201),
        U("GET", f"{J}/jobs/<int:job_id>/tests", operations.job_tests, "A job's test results with a summary"),
        # Projects
        U("GET", f"{J}/projects", projects.list_projects, "Projects with their pipelines and chains"),
        U("POST", f"{J}/projects/import", projects.import_project,
          "Import a project from strictly validated YAML (inline, or a file path for admins)",
          rule=OWNERSHIP + " " + REPOSITORY_RULE, body=projects.ImportBody, status=201),
        U("GET", f"{J}/projects/<int:project_id>", projects.get_project, "One project"),
        U("DELETE", f"{J}/projects/<int:project_id>", projects.delete_project, "Delete a project", status=204),
        U("GET", f"{J}/projects/<int:project_id>/icon", projects.project_icon, "The project's icon",
          content_type="image/*"),
        U("POST", f"{J}/projects/<int:project_id>/reload", projects.reload_project,
          "Re-read and re-validate the project's YAML", rule=OWNERSHIP + " " + REPOSITORY_RULE),
        # Pipelines
        U("POST", f"{J}/pipelines/<int:pipeline_id>/run-selection", runs.pipeline_run_selection,
          "Run a pipeline (optionally a selection of steps)", rule=OWNERSHIP + " " + SHARED, body=runs.RunBody,
          status=201),
        U("POST", f"{J}/pipelines/<int:pipeline_id>/dry-run-preview", runs.pipeline_preview,
          "What a run would do; writes nothing", rule=OWNERSHIP + " " + SHARED, body=runs.RunBody),
        U("GET", f"{J}/pipelines/<int:pipeline_id>/source-refs", runs.pipeline_source_refs,
          "Branches and tags of the pipeline's repository", rule=OWNERSHIP + " " + REPOSITORY_RULE),
        U("POST", f"{J}/pipelines/<int:pipeline_id>/eligible-agents", runs.pipeline_eligible_agents,
          "Which agents could run the pipeline, and why not", rule=OWNERSHIP + " " + SHARED, body=runs.ChainRunBody),
        U("GET", f"{J}/pipelines/<int:pipeline_id>/version-resolve", version_stream.version_resolve,
          "Resolve a source ref to commit and version (Server-Sent Events)", rule=OWNERSHIP + " " + REPOSITORY_RULE,
          extra_doc=_SSE),
        # Pipeline chains
        U("POST", f"{J}/pipeline-chains/<int:chain_id>/run", runs.chain_run,
          "Run every pipeline of a chain in order", rule=OWNERSHIP + " " + SHARED, body=runs.ChainRunBody,
          status=201),
        U("POST", f"{J}/pipeline-chains/<int:chain_id>/dry-run-preview", runs.chain_preview,
          "What a chain run would do; writes nothing", rule=OWNERSHIP + " " + SHARED, body=runs.ChainRunBody),
        U("GET", f"{J}/pipeline-chains/<int:chain_id>/source-refs", runs.chain_source_refs,
          "Branches and tags of the chain's repository", rule=OWNERSHIP + " " + REPOSITORY_RULE),
        U("POST", f"{J}/pipeline-chains/<int:chain_id>/eligible-agents", runs.chain_eligible_agents,
          "Eligible agents per pipeline of the chain", rule=OWNERSHIP + " " + SHARED, body=runs.ChainRunBody),
        # Vault
        U("GET", f"{J}/vault/connections", vault.list_connections, "Vault connections (never secrets)",
          rule=OWNERSHIP + " " + VAULT_RULE),
        U("POST", f"{J}/vault/connections", vault.create_connection, "Add a connection; its secret is sealed",
          rule=OWNERSHIP + " " + VAULT_RULE + " " + REPOSITORY_RULE, body=vault.CreateConnectionBody, status=201),
        U("DELETE", f"{J}/vault/connections/<int:connection_id>", vault.delete_connection, "Delete a connection",
          rule=OWNERSHIP + " " + VAULT_RULE, status=204),
        U("POST", f"{J}/vault/connections/<int:connection_id>/test", vault.test_connection,
          "Prove a connection works with a real call", rule=OWNERSHIP + " " + VAULT_RULE),
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
