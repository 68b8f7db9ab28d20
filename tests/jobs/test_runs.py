"""Starting work: run-selection and chain runs with source_ref, agent_id, dry_run, execution_mode
offline_cached and offline_cached_only; previews and eligible agents; source refs and the SSE
version resolve, against a real git repository made by the test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.jobs.conftest import PROJECT_YAML, Jobs, wait_for_status


def _git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "HOME": str(repo), "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repo = tmp_path / "source"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "README").write_text("one\n")
    _git(repo, "add", "README")
    _git(repo, "commit", "-q", "-m", "one")
    _git(repo, "tag", "-a", "v1.0.0", "-m", "first release")
    (repo / "README").write_text("two\n")
    _git(repo, "commit", "-q", "-am", "two")
    _git(repo, "branch", "feature")
    return repo


async def _project_with_repo(jobs: Jobs, repo: Path) -> dict:
    return await jobs.import_project(PROJECT_YAML.replace("  default_ref: main", f"  default_ref: main\n  repository: {repo}"))


async def test_source_refs_list_branches_and_tags(jobs: Jobs, repository: Path) -> None:
    project = await _project_with_repo(jobs, repository)
    refs = await jobs.client.get(f"/api/v1/pipelines/{project['pipelines'][0]['id']}/source-refs", headers=jobs.operator)
    assert refs.status_code == 200, refs.text
    by_name = {r["name"]: r for r in refs.json()["refs"]}
    assert set(by_name) == {"main", "feature", "v1.0.0"}
    assert by_name["main"]["sha"] == _git(repository, "rev-parse", "main")
    assert by_name["v1.0.0"] == {"name": "v1.0.0", "ref": "refs/tags/v1.0.0", "kind": "tag",
                                 "sha": _git(repository, "rev-parse", "v1.0.0^{commit}")}
    chain_refs = await jobs.client.get(f"/api/v1/pipeline-chains/{project['chains'][0]['id']}/source-refs",
                                       headers=jobs.operator)
    assert chain_refs.json()["refs"] == refs.json()["refs"]


async def test_source_refs_of_a_missing_repository_is_a_502(jobs: Jobs, tmp_path: Path) -> None:
    project = await _project_with_repo(jobs, tmp_path / "nowhere")
    refs = await jobs.client.get(f"/api/v1/pipelines/{project['pipelines'][0]['id']}/source-refs", headers=jobs.operator)
    assert refs.status_code == 502 and refs.json()["error"] == "SOURCE_UNAVAILABLE"


async def _sse(jobs: Jobs, pipeline_id: int, **params: str) -> list[tuple[str, dict]]:
    events = []
    async with jobs.client.stream("GET", f"/api/v1/pipelines/{pipeline_id}/version-resolve", params=params,
                                  headers=jobs.operator) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[len("data: "):])))
    return events


async def test_version_resolve_streams_server_sent_events(jobs: Jobs, repository: Path) -> None:
    project = await _project_with_repo(jobs, repository)
    pipeline_id = project["pipelines"][0]["id"]
    events = await _sse(jobs, pipeline_id, source_ref="v1.0.0")
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "started" and kinds[-2:] == ["resolved", "done"] and kinds.count("ref") == 3
    resolved = dict(events)["resolved"]
    assert resolved == {"source_ref": "v1.0.0", "sha": _git(repository, "rev-parse", "v1.0.0^{commit}"),
                        "kind": "tag", "version": "v1.0.0"}
    main = dict(await _sse(jobs, pipeline_id))["resolved"]  # the project's default ref
    assert main["sha"] == _git(repository, "rev-parse", "main") and main["version"] == f"main-{main['sha'][:12]}"
    missing = dict(await _sse(jobs, pipeline_id, source_ref="nope"))
    assert missing["error"] == {"error": "REF_NOT_FOUND", "details": {"source_ref": "nope"}} and "resolved" not in missing


async def test_dry_runs_write_nothing_and_explain_eligibility(jobs: Jobs) -> None:
    project = await jobs.import_project()
    build = project["pipelines"][0]["id"]
    linux = await jobs.register_runner("linux-box", ["linux"])
    await jobs.register_runner("mac-box", ["macos"])
    await linux.heartbeat()
    preview = await jobs.client.post(f"/api/v1/pipelines/{build}/dry-run-preview", json={"steps": ["package"]},
                                     headers=jobs.operator)
    assert preview.status_code == 200
    body = preview.json()
    assert body["dry_run"] is True and body["would_queue"] is True and body["source_ref"] == "main"
    entry = body["pipelines"][0]
    assert entry["steps"] == ["package"] and entry["eligible_agents"] == [linux.id]
    mac = next(a for a in entry["agents"] if a["name"] == "mac-box")
    assert mac["eligible"] is False and "missing labels: linux" in mac["reasons"] and "agent is offline" in mac["reasons"]
    dry = await jobs.client.post(f"/api/v1/pipelines/{build}/run-selection", json={"dry_run": True},
                                 headers=jobs.operator)
    assert dry.status_code == 200 and dry.json()["dry_run"] is True
    chain = project["chains"][0]["id"]
    chain_dry = await jobs.client.post(f"/api/v1/pipeline-chains/{chain}/run", json={"dry_run": True},
                                       headers=jobs.operator)
    assert [p["name"] for p in chain_dry.json()["pipelines"]] == ["build", "test"]
    chain_preview = await jobs.client.post(f"/api/v1/pipeline-chains/{chain}/dry-run-preview", json={},
                                           headers=jobs.operator)
    assert chain_preview.json()["chain"]["name"] == "release"
    eligible = await jobs.client.post(f"/api/v1/pipeline-chains/{chain}/eligible-agents", json={},
                                      headers=jobs.operator)
    assert [p["eligible_agents"] for p in eligible.json()["pipelines"]] == [[linux.id], [linux.id]]
    jobs_listing = await jobs.client.get("/api/v1/jobs", headers=jobs.operator)
    assert jobs_listing.json()["total"] == 0  # previews and dry runs queued nothing
    unknown = await jobs.client.post(f"/api/v1/pipelines/{build}/run-selection", json={"steps": ["deploy"]},
                                     headers=jobs.operator)
    assert unknown.status_code == 422 and unknown.json()["details"][0]["field"] == "steps.0"
    extra = await jobs.client.post(f"/api/v1/pipelines/{build}/run-selection", json={"dry_run": "yes"},
                                   headers=jobs.operator)
    assert extra.status_code == 422 and extra.json()["details"][0]["field"] == "dry_run"


async def test_run_selection_pins_agent_and_source_ref(jobs: Jobs) -> None:
    project = await jobs.import_project()
    build = project["pipelines"][0]["id"]
    chosen, other = await jobs.register_runner("chosen"), await jobs.register_runner("other")
    job = await jobs.run_pipeline(build, agent_id=chosen.id, source_ref="feature", steps=["compile"])
    assert job["pinned_agent_id"] == chosen.id and job["source_ref"] == "feature"
    assert [s["name"] for s in job["steps"]] == ["compile"] and job["env"] == {"MODE": "release"}
    assert (await other.lease())["assigned"] is False
    assert (await chosen.lease())["job"]["id"] == job["id"]
    nobody = await jobs.client.post(f"/api/v1/pipelines/{build}/run-selection", json={"agent_id": "agt_nobody"},
                                    headers=jobs.operator)
    assert nobody.status_code == 409 and nobody.json()["error"] == "RUN_BLOCKED"
    eligible = await jobs.client.post(f"/api/v1/pipelines/{build}/eligible-agents", json={"agent_id": chosen.id},
                                      headers=jobs.operator)
    assert [a["id"] for a in eligible.json()["agents"]] == [chosen.id]


async def test_offline_cached_runs_only_pinned_and_cached_sources(jobs: Jobs) -> None:
    project = await jobs.import_project()
    build = project["pipelines"][0]["id"]
    sha = "0123456789abcdef0123456789abcdef01234567"
    cached, uncached = await jobs.register_runner("cached"), await jobs.register_runner("uncached")
    url = f"/api/v1/pipelines/{build}/run-selection"
    branch = await jobs.client.post(url, json={"execution_mode": "offline_cached", "source_ref": "main"},
                                    headers=jobs.operator)
    assert branch.status_code == 409 and "pinned to a commit SHA" in branch.json()["details"]["blockers"][0]
    nothing_cached = await jobs.client.post(url, json={"execution_mode": "offline_cached", "source_ref": sha},
                                            headers=jobs.operator)
    assert nothing_cached.status_code == 409 and "cached" in nothing_cached.json()["details"]["blockers"][0]

    await cached.heartbeat(cached_sources=[{"project": "demo", "ref": sha}])
    await uncached.heartbeat()
    only_cached = await jobs.client.post(f"/api/v1/pipelines/{build}/eligible-agents",
                                         json={"offline_cached_only": True, "source_ref": sha}, headers=jobs.operator)
    assert only_cached.json()["eligible_agents"] == [cached.id]
    everyone = await jobs.client.post(f"/api/v1/pipelines/{build}/eligible-agents", json={"source_ref": sha},
                                      headers=jobs.operator)
    assert sorted(everyone.json()["eligible_agents"]) == sorted([cached.id, uncached.id])

    job = await jobs.run_pipeline(build, execution_mode="offline_cached", source_ref=sha)
    assert job["execution_mode"] == "offline_cached"
    assert (await uncached.lease())["assigned"] is False
    assert (await cached.lease())["job"]["id"] == job["id"]


async def test_chain_runs_in_order_and_stops_when_a_link_fails(jobs: Jobs) -> None:
    project = await jobs.import_project()
    runner = await jobs.register_runner()
    started = await jobs.client.post(f"/api/v1/pipeline-chains/{project['chains'][0]['id']}/run", json={},
                                     headers=jobs.operator)
    assert started.status_code == 201
    build, test = started.json()["jobs"]
    assert test["depends_on"] == build["id"] and test["chain_run"] == build["chain_run"]
    assert (await runner.lease())["job"]["id"] == build["id"]
    assert (await runner.lease())["assigned"] is False  # test waits for build
    await runner.status(build["id"], "running")
    await runner.status(build["id"], "failed", exit_code=1, error="compile error")
    downstream = await wait_for_status(jobs, test["id"], "failed")
    assert downstream["error"] == "upstream job failed"
    assert (await runner.lease())["assigned"] is False
