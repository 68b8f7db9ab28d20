"""End to end with the reference runner (bench/runner.py) against the real gateway: a chain of
pipelines runs in order, output streams in, artifacts stream up, test results arrive structured;
a cancelled job's process is stopped because the heartbeat answer says so."""

from __future__ import annotations

import hashlib
from functools import partial

import trio

from bench.runner import ReferenceRunner
from tests.jobs.conftest import Jobs, wait_for_status

E2E_YAML = """\
project:
  name: e2e
pipelines:
  - name: build
    labels: [linux]
    env: {GREETING: hello}
    steps:
      - name: compile
        run: echo "$GREETING from job $ZLH_JOB_ID"
      - name: package
        run: |
          head -c 300000 /dev/zero | tr '\\0' 'z' > "$ZLH_ARTIFACTS_DIR/bundle.txt"
          echo packaged
  - name: test
    labels: [linux]
    steps:
      - name: unit
        run: |
          printf '%s' '{"suite": "unit", "cases": [{"name": "adds", "status": "passed", "duration_ms": 1.5}, {"name": "divides", "status": "failed", "message": "ZeroDivisionError"}]}' > "$ZLH_REPORTS_DIR/unit.json"
          echo tested
  - name: slow
    labels: [linux]
    steps:
      - name: wait
        run: echo started; sleep 30; echo never
  - name: broken
    labels: [linux]
    steps:
      - name: explode
        run: echo about to fail; exit 3
      - name: unreachable
        run: echo never
chains:
  - name: release
    pipelines: [build, test]
"""


async def _start_runner(jobs: Jobs, nursery: trio.Nursery, tmp_path, name: str = "ref") -> ReferenceRunner:
    registered = await jobs.register_runner(name)
    token = registered.headers["authorization"].split(" ", 1)[1]
    runner = ReferenceRunner(jobs.client, token, tmp_path / name, heartbeat_interval=0.2, poll_interval=0.05)
    await nursery.start(partial(runner.run))
    return runner


async def test_reference_runner_runs_a_chain_with_artifacts_and_tests(jobs: Jobs, tmp_path) -> None:
    project = await jobs.import_project(E2E_YAML)
    chain = project["chains"][0]
    started = await jobs.client.post(f"/api/v1/pipeline-chains/{chain['id']}/run", json={}, headers=jobs.operator)
    assert started.status_code == 201, started.text
    build, test = started.json()["jobs"]
    assert test["depends_on"] == build["id"]
    async with trio.open_nursery() as nursery:
        await _start_runner(jobs, nursery, tmp_path)
        built = await wait_for_status(jobs, build["id"], "done", 20)
        tested = await wait_for_status(jobs, test["id"], "done", 20)
        nursery.cancel_scope.cancel()
    assert f"hello from job {build['id']}" in built["output"].splitlines()
    assert "packaged" in built["output"].splitlines()
    assert tested["started_at"] >= built["finished_at"]  # the chain ran in order

    listing = (await jobs.client.get(f"/api/v1/jobs/{build['id']}/artifacts", headers=jobs.operator)).json()
    (artifact,) = listing["artifacts"]
    assert artifact["name"] == "bundle.txt" and artifact["size"] == 300_000
    download = await jobs.client.get(artifact["download"], headers=jobs.operator)
    assert download.content == b"z" * 300_000
    assert artifact["sha256"] == hashlib.sha256(download.content).hexdigest()

    report = (await jobs.client.get(f"/api/v1/jobs/{test['id']}/tests", headers=jobs.operator)).json()
    assert report["summary"]["passed"] == 1 and report["summary"]["failed"] == 1
    assert report["cases"][1]["message"] == "ZeroDivisionError"


async def test_failing_step_fails_the_job_with_its_exit_code(jobs: Jobs, tmp_path) -> None:
    project = await jobs.import_project(E2E_YAML)
    broken = next(p for p in project["pipelines"] if p["name"] == "broken")
    job = await jobs.run_pipeline(broken["id"])
    async with trio.open_nursery() as nursery:
        await _start_runner(jobs, nursery, tmp_path)
        failed = await wait_for_status(jobs, job["id"], "failed", 20)
        nursery.cancel_scope.cancel()
    assert failed["exit_code"] == 3 and failed["error"] == "step explode exited 3"
    assert "about to fail" in failed["output"].splitlines() and "never" not in failed["output"].splitlines()


async def test_cancel_stops_the_runners_process(jobs: Jobs, tmp_path) -> None:
    project = await jobs.import_project(E2E_YAML)
    slow = next(p for p in project["pipelines"] if p["name"] == "slow")
    job = await jobs.run_pipeline(slow["id"])
    async with trio.open_nursery() as nursery:
        runner = await _start_runner(jobs, nursery, tmp_path)
        with trio.fail_after(20):
            while "started" not in (await jobs.job(job["id"]))["output"].splitlines():
                await trio.sleep(0.05)
        cancelled = await jobs.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=jobs.operator)
        assert cancelled.status_code == 200
        with trio.fail_after(5):  # well before the step's 30 s sleep ends
            while job["id"] not in runner.finished:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    final = await jobs.job(job["id"])
    assert final["status"] == "failed" and final["error"] == "cancelled by user"
    assert "started" in final["output"].splitlines() and "never" not in final["output"].splitlines()
