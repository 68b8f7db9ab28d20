"""Job-backend multi-tenancy, table-driven over control.jobs.routes(): user B tries every route with
user A's ids and is refused (the 404 of an object that does not exist; 401 on runner-only routes, 403
on admin-only ones), B's listings show none of A's objects, and A's objects are unchanged afterwards.
A route added to routes() without an entry in ATTEMPTS fails the test. Real gateway, real sockets,
SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from control.jobs import routes
from tests.jobs.conftest import PROJECT_YAML, Jobs, RunnerClient

SECRET_A = "a-vault-secret-0123456789"


@dataclass
class World:
    """A's objects, and the callers."""

    jobs: Jobs
    a: dict[str, str]
    b: dict[str, str]
    runner: RunnerClient
    project: dict[str, Any]
    pipeline_id: int
    chain_id: int
    done_job: int
    queued_job: int
    connection_id: int

    @property
    def ids(self) -> dict[str, Any]:
        return {"job_id": self.done_job, "project_id": self.project["id"], "pipeline_id": self.pipeline_id,
                "chain_id": self.chain_id, "connection_id": self.connection_id, "agent_id": self.runner.id,
                "name": "report.txt"}


async def _world(jobs: Jobs) -> World:
    a = jobs.operator
    b = jobs.gateway.bearer(await jobs.gateway.register("b@example.com"))
    connection = await jobs.client.post("/api/v1/vault/connections", headers=a, json={
        "name": "a-creds", "kind": "git", "url": "http://127.0.0.1:9/a/repo.git", "secret": SECRET_A})
    assert connection.status_code == 201, connection.text
    project = await jobs.import_project(PROJECT_YAML.replace("  default_ref: main", "  default_ref: main\n"
                                                             "  vault_connection: a-creds"))
    runner = await jobs.register_runner("shared-box")
    done = await jobs.run_pipeline(project["pipelines"][0]["id"])
    assert (await runner.lease())["job"]["id"] == done["id"]
    await runner.status(done["id"], "running", output="building\n")
    upload = await jobs.client.post(f"/api/v1/jobs/{done['id']}/artifacts", params={"name": "report.txt"},
                                    content=b"A's artifact", headers=runner.headers)
    assert upload.status_code == 201, upload.text
    tests = await jobs.client.post(f"/api/v1/jobs/{done['id']}/tests", headers=runner.headers,
                                   json={"suite": "unit", "cases": [{"name": "ok", "status": "passed"}]})
    assert tests.status_code == 201
    await runner.status(done["id"], "done", exit_code=0)
    queued = await jobs.run_pipeline(project["pipelines"][1]["id"])
    return World(jobs, a, b, runner, project, project["pipelines"][0]["id"], project["chains"][0]["id"],
                 done["id"], queued["id"], connection.json()["id"])


def _path(route_path: str, ids: dict[str, Any]) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", lambda m: str(ids[m.group(1)]), route_path)


async def _snapshot(world: World) -> dict[str, Any]:
    """Everything of A's, read as A."""
    client, a = world.jobs.client, world.a
    reads = [f"/api/v1/projects/{world.project['id']}", f"/api/v1/jobs/{world.done_job}",
             f"/api/v1/jobs/{world.queued_job}", f"/api/v1/jobs/{world.done_job}/artifacts",
             f"/api/v1/jobs/{world.done_job}/tests", "/api/v1/vault/connections", "/api/v1/projects",
             f"/api/v1/jobs/{world.done_job}/artifacts/report.txt"]
    snapshot: dict[str, Any] = {}
    for path in reads:
        response = await client.get(path, headers=a)
        assert response.status_code == 200, (path, response.text)
        snapshot[path] = response.content
    return snapshot


Check = Callable[[World, httpx.Response], Awaitable[None] | None]


def refused(status: int) -> Check:
    def check(world: World, response: httpx.Response) -> None:
        assert response.status_code == status, response.text
        assert SECRET_A not in response.text

    return check


def not_found(world: World, response: httpx.Response) -> None:
    assert response.status_code == 404, response.text
    assert response.json()["error"].endswith("_NOT_FOUND")


def lists_none_of_a(key: str) -> Check:
    def check(world: World, response: httpx.Response) -> None:
        assert response.status_code == 200, response.text
        ids = {item["id"] for item in response.json()[key]}
        assert ids.isdisjoint({world.project["id"], world.done_job, world.queued_job, world.connection_id})
        assert "a-creds" not in response.text and "demo" not in response.text

    return check


def b_own_only(world: World, response: httpx.Response) -> None:
    """Routes without an id of A's: B's answer concerns only B (checked by A's snapshot afterwards)."""
    assert response.status_code in (200, 201), response.text
    assert SECRET_A not in response.text and "a-creds" not in response.text


def runtime_of_b(world: World, response: httpx.Response) -> None:
    assert response.status_code == 200
    assert response.json()["jobs"] == {s: 0 for s in ("queued", "leased", "running", "done", "failed", "cancelled")}


def shared_runner_seen(world: World, response: httpx.Response) -> None:
    """B may see (a reduced view of) a shared runner, never the jobs it ran for A."""
    assert response.status_code == 200
    body = response.json()
    agents = body.get("agents", [body])
    assert [a["id"] for a in agents] == [world.runner.id]
    assert "current_jobs" not in response.text and "cached_sources" not in response.text


# Every route of the job backend: (method, path) → (request body, what B must get with A's ids).
ATTEMPTS: dict[tuple[str, str], tuple[Any, Check]] = {
    ("GET", "/healthz"): (None, b_own_only),
    ("GET", "/api/v1/runtime-state"): (None, runtime_of_b),
    ("GET", "/api/v1/server-info"): (None, b_own_only),
    ("POST", "/api/v1/heartbeat"): ({}, refused(401)),
    ("POST", "/api/v1/agent/lease"): (None, refused(401)),
    ("POST", "/api/v1/jobs/<int:job_id>/status"): ({"status": "failed"}, refused(401)),
    ("POST", "/api/v1/jobs/<int:job_id>/artifacts"): (b"B's bytes", refused(401)),
    ("POST", "/api/v1/jobs/<int:job_id>/tests"): ({"suite": "s", "cases": [{"name": "x", "status": "failed"}]},
                                                  refused(401)),
    ("GET", "/api/v1/jobs/<int:job_id>"): (None, not_found),
    ("GET", "/api/v1/jobs/<int:job_id>/artifacts"): (None, not_found),
    ("GET", "/api/v1/jobs/<int:job_id>/artifacts/<name>"): (None, not_found),
    ("POST", "/api/v1/agents"): ({"name": "b-runner", "shared": True}, refused(403)),
    ("GET", "/api/v1/agents"): (None, shared_runner_seen),
    ("GET", "/api/v1/agents/<agent_id>"): (None, shared_runner_seen),
    ("POST", "/api/v1/agents/<agent_id>/actions"): ({"action": "deactivate"}, refused(403)),
    ("GET", "/api/v1/jobs"): (None, lists_none_of_a("jobs")),
    ("POST", "/api/v1/jobs/clear-queue"): (None, b_own_only),
    ("POST", "/api/v1/jobs/flush-history"): (None, b_own_only),
    ("DELETE", "/api/v1/jobs/<int:job_id>"): (None, not_found),
    ("POST", "/api/v1/jobs/<int:job_id>/cancel"): (None, not_found),
    ("POST", "/api/v1/jobs/<int:job_id>/rerun"): (None, not_found),
    ("GET", "/api/v1/jobs/<int:job_id>/tests"): (None, not_found),
    ("GET", "/api/v1/projects"): (None, lists_none_of_a("projects")),
    ("POST", "/api/v1/projects/import"): ({"yaml": PROJECT_YAML.replace("name: demo", "name: b-demo")}, b_own_only),
    ("GET", "/api/v1/projects/<int:project_id>"): (None, not_found),
    ("DELETE", "/api/v1/projects/<int:project_id>"): (None, not_found),
    ("GET", "/api/v1/projects/<int:project_id>/icon"): (None, not_found),
    ("POST", "/api/v1/projects/<int:project_id>/reload"): (None, not_found),
    ("POST", "/api/v1/pipelines/<int:pipeline_id>/run-selection"): ({}, not_found),
    ("POST", "/api/v1/pipelines/<int:pipeline_id>/dry-run-preview"): ({}, not_found),
    ("GET", "/api/v1/pipelines/<int:pipeline_id>/source-refs"): (None, not_found),
    ("POST", "/api/v1/pipelines/<int:pipeline_id>/eligible-agents"): ({}, not_found),
    ("GET", "/api/v1/pipelines/<int:pipeline_id>/version-resolve"): (None, not_found),
    ("POST", "/api/v1/pipeline-chains/<int:chain_id>/run"): ({}, not_found),
    ("POST", "/api/v1/pipeline-chains/<int:chain_id>/dry-run-preview"): ({}, not_found),
    ("GET", "/api/v1/pipeline-chains/<int:chain_id>/source-refs"): (None, not_found),
    ("POST", "/api/v1/pipeline-chains/<int:chain_id>/eligible-agents"): ({}, not_found),
    ("GET", "/api/v1/vault/connections"): (None, lists_none_of_a("connections")),
    ("POST", "/api/v1/vault/connections"): ({"name": "b-creds", "kind": "git", "url": "http://127.0.0.1:9/b.git",
                                             "secret": "b-secret"}, b_own_only),
    ("DELETE", "/api/v1/vault/connections/<int:connection_id>"): (None, not_found),
    ("POST", "/api/v1/vault/connections/<int:connection_id>/test"): (None, not_found),
    ("POST", "/api/v1/update/check"): (None, refused(403)),
    ("POST", "/api/v1/update/apply"): ({"dry_run": True}, refused(403)),
    ("POST", "/api/v1/update/rollback"): ({"dry_run": True}, refused(403)),
    ("GET", "/api/v1/update/tags"): (None, refused(403)),
    ("GET", "/api/v1/update/status"): (None, refused(403)),
    ("POST", "/api/v1/server/restart"): ({"dry_run": True}, refused(403)),
}


def test_every_job_route_has_a_cross_tenant_attempt() -> None:
    mounted = {(route.method, route.path) for route in routes()}
    assert mounted - set(ATTEMPTS) == set(), "a job route without a cross-tenant test entry"
    assert set(ATTEMPTS) - mounted == set(), "a test entry for a route that is gone"


async def _attempt(world: World, method: str, path: str, body: Any) -> httpx.Response:
    url = _path(path, world.ids)
    if isinstance(body, bytes):
        return await world.jobs.client.request(method, url, content=body, params={"name": "evil.txt"},
                                               headers=world.b)
    if path.endswith("/version-resolve"):
        async with world.jobs.client.stream(method, url, headers=world.b) as response:
            await response.aread()
            return response
    return await world.jobs.client.request(method, url, json=body, headers=world.b)


async def test_user_b_is_refused_every_route_with_user_a_ids(jobs: Jobs) -> None:
    world = await _world(jobs)
    before = await _snapshot(world)
    for route in routes():
        body, check = ATTEMPTS[(route.method, route.path)]
        response = await _attempt(world, route.method, route.path, body)
        try:
            result = check(world, response)
            if result is not None:
                await result
        except AssertionError as exc:
            raise AssertionError(f"{route.method} {route.path}: {exc}") from exc
    assert await _snapshot(world) == before
    # The runner was not deactivated, A's queued job still waits, and B's own import is B's alone.
    assert (await jobs.job(world.queued_job))["status"] == "queued"
    b_projects = (await jobs.client.get("/api/v1/projects", headers=world.b)).json()["projects"]
    assert [p["name"] for p in b_projects] == ["b-demo"]
    a_projects = (await jobs.client.get("/api/v1/projects", headers=world.a)).json()["projects"]
    assert [p["name"] for p in a_projects] == ["demo"]


async def test_admin_sees_and_acts_on_every_tenant(jobs: Jobs) -> None:
    world = await _world(jobs)
    admin = jobs.admin
    assert (await jobs.client.get(f"/api/v1/jobs/{world.done_job}", headers=admin)).status_code == 200
    listing = (await jobs.client.get("/api/v1/jobs", headers=admin)).json()
    assert {j["id"] for j in listing["jobs"]} == {world.done_job, world.queued_job}
    assert [c["name"] for c in (await jobs.client.get("/api/v1/vault/connections", headers=admin)).json()[
        "connections"]] == ["a-creds"]
    rerun = await jobs.client.post(f"/api/v1/jobs/{world.done_job}/rerun", headers=admin)
    assert rerun.status_code == 201
    # A rerun (and any run) belongs to the caller: the admin's rerun is not A's job.
    assert rerun.json()["owner_id"] != (await jobs.job(world.done_job))["owner_id"]
    assert (await jobs.client.get(f"/api/v1/jobs/{rerun.json()['id']}", headers=world.a)).status_code == 404
    own_rerun = await jobs.client.post(f"/api/v1/jobs/{world.done_job}/rerun", headers=world.a)
    assert own_rerun.status_code == 201 and (await jobs.job(own_rerun.json()["id"]))["rerun_of"] == world.done_job
    cancelled = await jobs.client.post(f"/api/v1/jobs/{world.queued_job}/cancel", headers=admin)
    assert cancelled.status_code == 200 and cancelled.json()["error"] == "cancelled by user"


async def test_clear_queue_and_flush_history_of_a_user_touch_only_their_jobs(jobs: Jobs) -> None:
    world = await _world(jobs)
    b_project = (await jobs.client.post("/api/v1/projects/import", headers=world.b, json={
        "yaml": PROJECT_YAML.replace("name: demo", "name: b-demo")})).json()
    b_job = (await jobs.client.post(f"/api/v1/pipelines/{b_project['pipelines'][1]['id']}/run-selection",
                                    json={}, headers=world.b)).json()["jobs"][0]
    assert (await jobs.client.post("/api/v1/jobs/clear-queue", headers=world.b)).json() == {"cleared": 1}
    assert (await jobs.client.get(f"/api/v1/jobs/{b_job['id']}", headers=world.b)).json()["status"] == "cancelled"
    assert (await jobs.job(world.queued_job))["status"] == "queued"
    assert (await jobs.client.post("/api/v1/jobs/flush-history", headers=world.b)).json() == {"deleted": 1}
    assert (await jobs.job(world.done_job))["status"] == "done"
    assert (await jobs.client.post("/api/v1/jobs/flush-history", headers=world.a)).json() == {"deleted": 1}
    assert (await jobs.client.get(f"/api/v1/jobs/{world.done_job}", headers=world.a)).status_code == 404


async def test_openapi_documents_the_ownership_rule_and_the_shared_flag(jobs: Jobs) -> None:
    document = (await jobs.client.get("/openapi.json")).json()
    for route in routes():
        operation = document["paths"][route.openapi_path][route.method.lower()]
        if route.auth == "user" or "/agents" in route.path:
            assert "Ownership" in operation.get("description", "") or "shared" in operation.get("description", ""), \
                f"{route.method} {route.path} does not state its rule"
    create = document["paths"]["/api/v1/agents"]["post"]
    schema = create["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in schema:  # pydantic models are hoisted into components/schemas
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    shared = schema["properties"]["shared"]
    assert shared["type"] == "boolean" and shared["default"] is False and "regular users" in shared["description"]
    assert "shared" in create["description"]
    lease = document["paths"]["/api/v1/agent/lease"]["post"]
    assert "shared" in lease["description"]
