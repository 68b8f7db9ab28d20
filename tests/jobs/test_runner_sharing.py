"""Runners and regular users: a runner that is not shared never leases a regular user's job (however
many wait, and however the user pins it), a shared one does, and an admin's jobs run on either. The
share / unshare actions flip it; previews and eligible-agents answer exactly what the lease does."""

from __future__ import annotations

from tests.jobs.conftest import PROJECT_YAML, Jobs


async def _admin_project(jobs: Jobs) -> dict:
    response = await jobs.client.post("/api/v1/projects/import", headers=jobs.admin,
                                      json={"yaml": PROJECT_YAML.replace("name: demo", "name: admin-demo")})
    assert response.status_code == 201, response.text
    return response.json()


async def test_a_runner_that_is_not_shared_never_leases_a_regular_users_job(jobs: Jobs) -> None:
    project = await jobs.import_project()
    build = project["pipelines"][0]["id"]
    private = await jobs.register_runner("private", shared=False)
    user_jobs = [await jobs.run_pipeline(build) for _ in range(60)]  # more than one lease scan looks at
    admin_build = (await _admin_project(jobs))["pipelines"][0]["id"]
    admin_job = (await jobs.client.post(f"/api/v1/pipelines/{admin_build}/run-selection", json={},
                                        headers=jobs.admin)).json()["jobs"][0]
    lease = await private.lease()
    assert lease["assigned"] is True and lease["job"]["id"] == admin_job["id"]  # not crowded out by the queue
    assert await private.lease() == {"assigned": False, "message": "no job available"}

    shared = await jobs.register_runner("shared", shared=True)
    assert (await shared.lease())["job"]["id"] == user_jobs[0]["id"]


async def test_pinning_and_eligible_agents_never_offer_a_runner_that_is_not_shared(jobs: Jobs) -> None:
    project = await jobs.import_project()
    build = project["pipelines"][0]["id"]
    private = await jobs.register_runner("private", shared=False)
    shared = await jobs.register_runner("shared", shared=True)
    await private.heartbeat()
    await shared.heartbeat()

    eligible = await jobs.client.post(f"/api/v1/pipelines/{build}/eligible-agents", json={}, headers=jobs.operator)
    assert [a["id"] for a in eligible.json()["agents"]] == [shared.id]
    pinned = await jobs.client.post(f"/api/v1/pipelines/{build}/run-selection", json={"agent_id": private.id},
                                    headers=jobs.operator)
    assert pinned.status_code == 409
    assert pinned.json()["details"]["blockers"] == [f"agent {private.id} does not exist"]  # not even a hint
    assert (await jobs.client.get(f"/api/v1/agents/{private.id}", headers=jobs.operator)).status_code == 404
    listing = await jobs.client.get("/api/v1/agents", headers=jobs.operator)
    assert [a["id"] for a in listing.json()["agents"]] == [shared.id]

    # The admin sees both, and why the private one could not take a regular user's job.
    admin_view = await jobs.client.post(f"/api/v1/pipelines/{build}/eligible-agents", json={}, headers=jobs.admin)
    assert sorted(admin_view.json()["eligible_agents"]) == sorted([private.id, shared.id])  # the admin's own run

    pinned_shared = await jobs.run_pipeline(build, agent_id=shared.id)
    assert (await private.lease())["assigned"] is False
    assert (await shared.lease())["job"]["id"] == pinned_shared["id"]


async def test_share_and_unshare_actions_change_what_a_runner_may_lease(jobs: Jobs) -> None:
    project = await jobs.import_project()
    build = project["pipelines"][0]["id"]
    runner = await jobs.register_runner("box", shared=False)
    job = await jobs.run_pipeline(build)
    assert (await runner.lease())["assigned"] is False
    act = f"/api/v1/agents/{runner.id}/actions"
    assert (await jobs.client.post(act, json={"action": "share"}, headers=jobs.operator)).status_code == 403
    shared = await jobs.client.post(act, json={"action": "share"}, headers=jobs.admin)
    assert shared.status_code == 200 and shared.json()["agent"]["shared"] is True
    assert (await runner.lease())["job"]["id"] == job["id"]

    later = await jobs.run_pipeline(build)
    unshared = await jobs.client.post(act, json={"action": "unshare"}, headers=jobs.admin)
    assert unshared.json()["agent"]["shared"] is False and unshared.json()["cancelled_jobs"] == []
    assert (await runner.lease())["assigned"] is False
    assert (await jobs.job(later["id"]))["status"] == "queued"
    assert (await jobs.job(job["id"]))["status"] == "leased"  # unsharing does not take a running job away
    bogus = await jobs.client.post(act, json={"action": "steal"}, headers=jobs.admin)
    assert bogus.status_code == 422


async def test_deactivate_keeps_the_seed_cancel_mutation(jobs: Jobs) -> None:
    project = await jobs.import_project()
    runner = await jobs.register_runner("box")
    job = await jobs.run_pipeline(project["pipelines"][0]["id"])
    await runner.lease()
    await runner.status(job["id"], "running", output="working")
    answer = await jobs.client.post(f"/api/v1/agents/{runner.id}/actions", json={"action": "deactivate"},
                                    headers=jobs.admin)
    assert answer.json()["cancelled_jobs"] == [job["id"]]
    cancelled = await jobs.job(job["id"])
    assert cancelled["status"] == "failed" and cancelled["error"] == "cancelled by user"
    assert cancelled["output"] == "working\n[control] job cancelled by user\n"
    assert await runner.lease() == {"assigned": False, "message": "agent is deactivated"}
