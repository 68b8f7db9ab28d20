"""Runner protocol: registration, heartbeat, lease, status reports, test results, artifacts."""

from __future__ import annotations

import hashlib

from tests.jobs.conftest import Jobs


async def test_runner_leases_reports_and_finishes_a_job(jobs: Jobs) -> None:
    project = await jobs.import_project()
    build = project["pipelines"][0]
    runner = await jobs.register_runner()
    assert (await runner.heartbeat(version="1.0", hostname="box")).status_code == 200
    queued = await jobs.run_pipeline(build["id"])
    assert queued["status"] == "queued"

    lease = await runner.lease()
    assert lease["assigned"] is True and lease["job"]["id"] == queued["id"]
    assert lease["job"]["status"] == "leased" and lease["job"]["steps"][0]["run"] == "echo compiling"
    assert (await runner.lease()) == {"assigned": False, "message": "no job available"}

    running = await runner.status(queued["id"], "running", output="compiling\n")
    assert running.status_code == 200 and running.json()["status"] == "running"
    assert (await runner.status(queued["id"], "running", output="packaging\n")).status_code == 200
    done = await runner.status(queued["id"], "done", exit_code=0)
    assert done.status_code == 200 and done.json()["status"] == "done"

    job = await jobs.job(queued["id"])
    assert job["status"] == "done" and job["exit_code"] == 0 and job["agent_id"] == runner.id
    assert job["output"] == "compiling\npackaging\n"
    # A finished job takes no more reports.
    late = await runner.status(queued["id"], "failed")
    assert late.status_code == 409 and late.json()["error"] == "LEASE_LOST"


async def test_runner_token_is_required_and_checked(jobs: Jobs) -> None:
    assert (await jobs.client.post("/api/v1/agent/lease")).status_code == 401
    bad = await jobs.client.post("/api/v1/agent/lease", headers={"authorization": "Bearer zlhr_nope"})
    assert bad.status_code == 401
    # An operator's access token is not a runner token.
    assert (await jobs.client.post("/api/v1/agent/lease", headers=jobs.operator)).status_code == 401


async def test_structured_test_results_are_recorded_and_summarised(jobs: Jobs) -> None:
    project = await jobs.import_project()
    runner = await jobs.register_runner()
    job = await jobs.run_pipeline(project["pipelines"][0]["id"])
    await runner.lease()
    report = {"suite": "unit", "cases": [
        {"name": "test_a", "status": "passed", "duration_ms": 3.5},
        {"name": "test_b", "status": "failed", "message": "assert 1 == 2"},
        {"name": "test_c", "status": "skipped"}]}
    posted = await jobs.client.post(f"/api/v1/jobs/{job['id']}/tests", json=report, headers=runner.headers)
    assert posted.status_code == 201 and posted.json()["recorded"] == 3
    bad = await jobs.client.post(f"/api/v1/jobs/{job['id']}/tests", headers=runner.headers,
                                 json={"suite": "unit", "cases": [{"name": "x", "status": "green"}]})
    assert bad.status_code == 422 and bad.json()["details"][0]["field"] == "cases.0.status"
    tests = await jobs.client.get(f"/api/v1/jobs/{job['id']}/tests", headers=jobs.operator)
    assert tests.status_code == 200
    assert tests.json()["summary"] == {"total": 3, "passed": 1, "failed": 1, "skipped": 1, "error": 0}
    assert tests.json()["cases"][1]["message"] == "assert 1 == 2"


async def test_artifact_is_streamed_to_disk_and_downloadable(jobs: Jobs) -> None:
    project = await jobs.import_project()
    runner = await jobs.register_runner()
    job = await jobs.run_pipeline(project["pipelines"][0]["id"])
    await runner.lease()
    payload = bytes(range(256)) * 12_000  # ~3 MiB: above the app-wide 1 MiB JSON body limit

    async def chunks(data: bytes):
        for start in range(0, len(data), 64 * 1024):
            yield data[start:start + 64 * 1024]

    url = f"/api/v1/jobs/{job['id']}/artifacts"
    uploaded = await jobs.client.post(url, params={"name": "app.bin"}, content=chunks(payload), headers=runner.headers)
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["size"] == len(payload)
    assert uploaded.json()["sha256"] == hashlib.sha256(payload).hexdigest()
    # With a Content-Length far above the 1 MiB JSON limit it lands whole too (the data plane streams it).
    again = await jobs.client.post(url, params={"name": "app.bin"}, content=payload, headers=runner.headers)
    assert again.status_code == 201 and again.json()["size"] == len(payload)

    listing = await jobs.client.get(url, headers=jobs.operator)
    assert [a["name"] for a in listing.json()["artifacts"]] == ["app.bin"]
    download = await jobs.client.get(listing.json()["artifacts"][0]["download"], headers=jobs.operator)
    assert download.status_code == 200 and download.content == payload
    on_disk = jobs.gateway.settings.data_dir / "artifacts" / str(job["id"])
    assert [p.name for p in on_disk.iterdir()] == ["app.bin"]  # no partial files left behind


async def test_artifact_uploads_are_capped_named_safely_and_need_the_lease(jobs: Jobs) -> None:
    project = await jobs.import_project()
    runner, other = await jobs.register_runner("a"), await jobs.register_runner("b")
    job = await jobs.run_pipeline(project["pipelines"][0]["id"])
    await runner.lease()
    url = f"/api/v1/jobs/{job['id']}/artifacts"
    cap = jobs.gateway.settings.artifact_max_bytes

    async def endless():
        block = b"x" * 256 * 1024
        for _ in range(cap // len(block) + 8):
            yield block

    too_big = await jobs.client.post(url, params={"name": "big.bin"}, content=endless(), headers=runner.headers)
    assert too_big.status_code == 413 and too_big.json()["error"] in ("ARTIFACT_TOO_LARGE", "PAYLOAD_TOO_LARGE")
    for name in ("../escape", ".hidden", "a/b", ""):
        bad = await jobs.client.post(url, params={"name": name}, content=b"x", headers=runner.headers)
        assert bad.status_code == 422, name
    stranger = await jobs.client.post(url, params={"name": "x.txt"}, content=b"x", headers=other.headers)
    assert stranger.status_code == 409 and stranger.json()["error"] == "LEASE_LOST"
    listing = await jobs.client.get(url, headers=jobs.operator)
    assert listing.json()["artifacts"] == []
    assert [p.name for p in (jobs.gateway.settings.data_dir / "artifacts" / str(job["id"])).iterdir()] == []
