"""Job lifecycle across runners and operators: safe concurrent leasing, lease expiry, deactivation
while running, cancel, rerun, clear-queue, flush-history, delete; and the transition table itself."""

from __future__ import annotations

from datetime import timedelta

import pytest
import trio

from control.jobs import lifecycle
from storage import clock
from tests.jobs.conftest import Jobs, wait_for_status


def test_transition_table_refuses_moves_out_of_terminal_states() -> None:
    assert lifecycle.advance("queued", "lease") == "leased"
    assert lifecycle.advance("running", "cancel") == "failed"
    for state in lifecycle.TERMINAL:
        for event in ("lease", "start", "succeed", "fail", "cancel", "requeue"):
            with pytest.raises(lifecycle.IllegalTransition):
                lifecycle.advance(state, event)
    with pytest.raises(lifecycle.IllegalTransition):
        lifecycle.advance("queued", "start")  # a job must be leased before it runs
    assert set(lifecycle.sources("cancel")) == {"queued", "leased", "running"}


async def test_many_runners_leasing_at_once_never_share_a_job(jobs: Jobs) -> None:
    project = await jobs.import_project()
    build = project["pipelines"][0]["id"]
    job_count, runner_count = 24, 12
    created = [(await jobs.run_pipeline(build))["id"] for _ in range(job_count)]
    runners = [await jobs.register_runner(f"r{i}") for i in range(runner_count)]
    leased: list[tuple[str, int]] = []

    async def drain(runner) -> None:
        while True:
            answer = await runner.lease()
            if not answer["assigned"]:
                return
            leased.append((runner.id, answer["job"]["id"]))

    async with trio.open_nursery() as nursery:
        for runner in runners:
            nursery.start_soon(drain, runner)
    ids = [job_id for _, job_id in leased]
    assert len(ids) == len(set(ids)), "a job was leased twice"
    assert sorted(ids) == sorted(created)
    for runner_id, job_id in leased[:3]:
        assert (await jobs.job(job_id))["agent_id"] == runner_id


async def test_lapsed_lease_requeues_then_fails_when_attempts_run_out(jobs: Jobs, moved_clock: None) -> None:
    project = await jobs.import_project()
    job = await jobs.run_pipeline(project["pipelines"][0]["id"])  # build: max_attempts 2
    first, second = await jobs.register_runner("a"), await jobs.register_runner("b")
    assert (await first.lease())["job"]["id"] == job["id"]
    await first.status(job["id"], "running")

    # Heartbeats keep the lease alive…
    clock.offset += timedelta(seconds=20)
    await first.heartbeat()
    clock.offset += timedelta(seconds=20)
    await trio.sleep(0.3)
    assert (await jobs.job(job["id"]))["status"] == "running"

    # …silence lets it lapse: re-queued, and the old holder's reports are refused.
    clock.offset += timedelta(seconds=31)
    requeued = await wait_for_status(jobs, job["id"], "queued")
    assert requeued["agent_id"] is None and requeued["attempts"] == 1
    assert "[control] lease expired; job re-queued" in requeued["output"].splitlines()
    stale = await first.status(job["id"], "done")
    assert stale.status_code == 409 and stale.json()["error"] == "LEASE_LOST"

    assert (await second.lease())["job"]["attempts"] == 2
    clock.offset += timedelta(seconds=31)
    failed = await wait_for_status(jobs, job["id"], "failed")
    assert failed["error"] == "lease expired"


async def test_deactivating_an_agent_cancels_its_running_job_and_blocks_leasing(jobs: Jobs) -> None:
    project = await jobs.import_project()
    job = await jobs.run_pipeline(project["pipelines"][0]["id"])
    runner = await jobs.register_runner()
    await runner.lease()
    await runner.status(job["id"], "running", output="step 1")

    answer = await jobs.client.post(f"/api/v1/agents/{runner.id}/actions", json={"action": "deactivate"},
                                    headers=jobs.admin)
    assert answer.status_code == 200, answer.text
    assert answer.json()["cancelled_jobs"] == [job["id"]] and answer.json()["agent"]["active"] is False
    cancelled = await jobs.job(job["id"])
    assert cancelled["status"] == "failed" and cancelled["error"] == "cancelled by user"
    assert cancelled["output"].splitlines() == ["step 1", "[control] job cancelled by user"]

    await jobs.run_pipeline(project["pipelines"][0]["id"])
    assert await runner.lease() == {"assigned": False, "message": "agent is deactivated"}
    beat = await runner.heartbeat(running_jobs=[job["id"]])
    assert beat.status_code == 200 and beat.json()["cancel_jobs"] == [job["id"]]
    assert (await runner.status(job["id"], "done")).status_code == 409

    reactivated = await jobs.client.post(f"/api/v1/agents/{runner.id}/actions", json={"action": "activate"},
                                         headers=jobs.admin)
    assert reactivated.json()["agent"]["active"] is True
    assert (await runner.lease())["assigned"] is True
    bad = await jobs.client.post(f"/api/v1/agents/{runner.id}/actions", json={"action": "pause"}, headers=jobs.admin)
    assert bad.status_code == 422
    missing = await jobs.client.post("/api/v1/agents/agt_nobody/actions", json={"action": "activate"},
                                     headers=jobs.admin)
    assert missing.status_code == 404
    # Only admins switch agents.
    assert (await jobs.client.post(f"/api/v1/agents/{runner.id}/actions", json={"action": "deactivate"},
                                   headers=jobs.operator)).status_code == 403


async def test_cancel_and_rerun(jobs: Jobs) -> None:
    project = await jobs.import_project()
    runner = await jobs.register_runner()
    job = await jobs.run_pipeline(project["pipelines"][0]["id"])
    await runner.lease()
    await runner.status(job["id"], "running", output="working\n")
    cancel = await jobs.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=jobs.operator)
    assert cancel.status_code == 200
    body = cancel.json()
    assert (body["status"], body["error"]) == ("failed", "cancelled by user")
    assert body["output"] == "working\n[control] job cancelled by user\n"
    again = await jobs.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=jobs.operator)
    assert again.status_code == 409 and again.json()["error"] == "ILLEGAL_TRANSITION"

    rerun = await jobs.client.post(f"/api/v1/jobs/{job['id']}/rerun", headers=jobs.operator)
    assert rerun.status_code == 201
    fresh = rerun.json()
    assert fresh["status"] == "queued" and fresh["rerun_of"] == job["id"] and fresh["id"] != job["id"]
    assert fresh["steps"] == job["steps"] and fresh["output"] == ""
    busy = await jobs.client.post(f"/api/v1/jobs/{fresh['id']}/rerun", headers=jobs.operator)
    assert busy.status_code == 409 and busy.json()["error"] == "JOB_NOT_FINISHED"
    assert (await jobs.client.post("/api/v1/jobs/999999/cancel", headers=jobs.operator)).status_code == 404


async def test_clear_queue_flush_history_and_delete(jobs: Jobs) -> None:
    project = await jobs.import_project()
    build = project["pipelines"][0]["id"]
    runner = await jobs.register_runner()
    running = await jobs.run_pipeline(build)
    await runner.lease()
    await runner.status(running["id"], "running")
    waiting = [(await jobs.run_pipeline(build))["id"] for _ in range(2)]

    cleared = await jobs.client.post("/api/v1/jobs/clear-queue", headers=jobs.operator)  # the operator's own
    assert cleared.json() == {"cleared": 2}
    assert (await jobs.client.post("/api/v1/jobs/clear-queue", headers=jobs.admin)).json() == {"cleared": 0}
    for job_id in waiting:
        assert (await jobs.job(job_id))["status"] == "cancelled"
    assert (await jobs.job(running["id"]))["status"] == "running"

    listing = await jobs.client.get("/api/v1/jobs", params={"status": "cancelled"}, headers=jobs.operator)
    assert listing.json()["total"] == 2 and {j["id"] for j in listing.json()["jobs"]} == set(waiting)
    assert (await jobs.client.get("/api/v1/jobs", params={"status": "bogus"}, headers=jobs.operator)).status_code == 422

    live_delete = await jobs.client.delete(f"/api/v1/jobs/{running['id']}", headers=jobs.operator)
    assert live_delete.status_code == 409
    assert (await jobs.client.delete(f"/api/v1/jobs/{waiting[0]}", headers=jobs.operator)).status_code == 204
    assert (await jobs.client.get(f"/api/v1/jobs/{waiting[0]}", headers=jobs.operator)).status_code == 404

    flushed = await jobs.client.post("/api/v1/jobs/flush-history", headers=jobs.admin)
    assert flushed.json() == {"deleted": 1}
    remaining = await jobs.client.get("/api/v1/jobs", headers=jobs.operator)
    assert [j["id"] for j in remaining.json()["jobs"]] == [running["id"]]


async def test_agents_list_and_get(jobs: Jobs) -> None:
    runner = await jobs.register_runner("builder", ["linux", "x86"])
    await runner.heartbeat(version="2.1", hostname="builder-1", cached_sources=[{"project": "demo", "ref": "abc1234"}])
    listing = await jobs.client.get("/api/v1/agents", headers=jobs.admin)
    assert listing.status_code == 200
    (agent,) = listing.json()["agents"]
    assert agent["id"] == runner.id and agent["status"] == "online" and agent["version"] == "2.1"
    one = await jobs.client.get(f"/api/v1/agents/{runner.id}", headers=jobs.admin)
    assert one.json()["cached_sources"] == [{"project": "demo", "ref": "abc1234"}]
    assert one.json()["current_jobs"] == [] and one.json()["shared"] is True
    assert "token" not in one.json() and "token_hash" not in one.json()
    # A regular user sees a shared runner only as far as choosing it needs: not its host or others' work.
    seen = (await jobs.client.get(f"/api/v1/agents/{runner.id}", headers=jobs.operator)).json()
    assert seen == {"id": runner.id, "name": "builder", "labels": ["linux", "x86"], "shared": True, "active": True,
                    "online": True, "status": "online"}
    assert (await jobs.client.get("/api/v1/agents/agt_missing", headers=jobs.operator)).status_code == 404
    assert (await jobs.client.get("/api/v1/agents")).status_code == 401
