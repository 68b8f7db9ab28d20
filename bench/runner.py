"""The reference runner agent for the job backend (seed 003): heartbeats, leases a job, runs its steps
as shell commands, streams its output, uploads artifacts chunk by chunk and reports structured test
results, then reports the outcome. Used by the end-to-end tests and runnable by hand:

    python -m bench.runner --url http://127.0.0.1:8080 --token zlhr_… --labels linux --workdir /tmp/runs

Conventions a step can rely on: it runs in a fresh directory per job, with the job's env plus
ZLH_JOB_ID, ZLH_SOURCE_REF, ZLH_ARTIFACTS_DIR (every file left there is uploaded as an artifact) and
ZLH_REPORTS_DIR (every `*.json` there, shaped `{"suite": …, "cases": [{"name", "status", …}]}`, is
posted as test results). The runner stops a job as soon as the gateway says it was taken away
(heartbeat `cancel_jobs`, or 409 on a report): from the structured answers, never from log text.
Every call carries a timeout; the runner never runs a job it does not hold."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import trio

log = logging.getLogger("zlh.bench.runner")

UPLOAD_CHUNK = 256 * 1024
UPLOAD_TRIES = 3
OUTPUT_FLUSH_SECONDS = 0.5


class LeaseLost(Exception):
    """The gateway no longer lets this runner report on the job (cancelled, re-queued, finished)."""


class ReferenceRunner:
    def __init__(self, client: httpx.AsyncClient, token: str, workdir: Path, *, labels: list[str] | None = None,
                 cached_sources: list[dict[str, str]] | None = None, heartbeat_interval: float = 5.0,
                 poll_interval: float = 1.0, version: str = "reference-1") -> None:
        self.client = client
        self.headers = {"authorization": f"Bearer {token}"}
        self.workdir = workdir
        self.labels = labels
        self.cached_sources = cached_sources or []
        self.heartbeat_interval = heartbeat_interval
        self.poll_interval = poll_interval
        self.version = version
        self.running: dict[int, trio.CancelScope] = {}
        self.finished: list[int] = []

    async def heartbeat(self) -> dict[str, Any]:
        body: dict[str, Any] = {"version": self.version, "hostname": os.uname().nodename,
                                "cached_sources": self.cached_sources, "running_jobs": sorted(self.running)}
        if self.labels is not None:
            body["labels"] = self.labels
        response = await self.client.post("/api/v1/heartbeat", json=body, headers=self.headers)
        response.raise_for_status()
        answer = response.json()
        for job_id in answer.get("cancel_jobs", []):
            scope = self.running.get(job_id)
            if scope is not None:
                log.info("job %s taken away by the gateway; stopping it", job_id)
                scope.cancel()
        return answer

    async def lease(self) -> dict[str, Any] | None:
        response = await self.client.post("/api/v1/agent/lease", headers=self.headers)
        response.raise_for_status()
        answer = response.json()
        return answer["job"] if answer.get("assigned") else None

    async def run(self, *, max_jobs: int | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat and work until cancelled (or after `max_jobs` jobs)."""
        async with trio.open_nursery() as nursery:
            await self.heartbeat()
            nursery.start_soon(self._heartbeat_loop)
            task_status.started()
            done = 0
            while max_jobs is None or done < max_jobs:
                job = await self.lease()
                if job is None:
                    await trio.sleep(self.poll_interval)
                    continue
                await self.execute(job)
                done += 1
            nursery.cancel_scope.cancel()

    async def _heartbeat_loop(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            try:
                await self.heartbeat()
            except httpx.HTTPError as exc:  # the gateway may be restarting; the lease tolerates a miss
                log.warning("heartbeat failed: %s", exc)

    async def report(self, job_id: int, status: str, **body: Any) -> dict[str, Any]:
        response = await self.client.post(f"/api/v1/jobs/{job_id}/status", json={"status": status, **body},
                                          headers=self.headers)
        if response.status_code == 409:
            raise LeaseLost(response.json().get("details"))
        response.raise_for_status()
        return response.json()

    async def execute(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        directory = self.workdir / f"job-{job_id}-{job['attempts']}"
        artifacts, reports = directory / "artifacts", directory / "reports"
        for path in (directory, artifacts, reports):
            await trio.Path(path).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **job["env"], "ZLH_JOB_ID": str(job_id), "ZLH_SOURCE_REF": job["source_ref"] or "",
               "ZLH_ARTIFACTS_DIR": str(artifacts), "ZLH_REPORTS_DIR": str(reports)}
        scope = trio.CancelScope()
        self.running[job_id] = scope
        try:
            with scope:
                await self.report(job_id, "running")
                with trio.move_on_after(job["timeout_seconds"]) as timer:
                    failure = await self._run_steps(job, directory, env)
                if timer.cancelled_caught:
                    failure = (None, f"timed out after {job['timeout_seconds']} s")
                await self._upload_artifacts(job_id, artifacts)
                await self._post_reports(job_id, reports)
                if failure is None:
                    await self.report(job_id, "done", exit_code=0)
                else:
                    code, error = failure
                    await self.report(job_id, "failed", exit_code=code, error=error)
        except LeaseLost as exc:
            log.info("job %s: lease lost (%s)", job_id, exc)
        finally:
            self.running.pop(job_id, None)
            self.finished.append(job_id)

    async def _run_steps(self, job: dict[str, Any], directory: Path,
                         env: dict[str, str]) -> tuple[int | None, str] | None:
        for step in job["steps"]:
            await self.report(job["id"], "running", output=f"$ {step['name']}: {step['run']}\n")
            code = await self._run_step(job["id"], step["run"], directory, env)
            if code != 0:
                return code, f"step {step['name']} exited {code}"
        return None

    async def _run_step(self, job_id: int, command: str, directory: Path, env: dict[str, str]) -> int:
        """Run one shell command, sending its output to the gateway about every half second."""
        process = await trio.lowlevel.open_process(["/bin/sh", "-c", command], cwd=str(directory), env=env,
                                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL)
        pending = bytearray()
        try:
            async with trio.open_nursery() as nursery:
                async def flush_periodically() -> None:
                    while True:
                        await trio.sleep(OUTPUT_FLUSH_SECONDS)
                        await self._flush(job_id, pending)

                nursery.start_soon(flush_periodically)
                assert process.stdout is not None
                async for chunk in process.stdout:
                    pending.extend(chunk)
                nursery.cancel_scope.cancel()
            await self._flush(job_id, pending)
            return await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()

    async def _flush(self, job_id: int, pending: bytearray) -> None:
        if pending:
            text = pending.decode(errors="replace")
            pending.clear()
            await self.report(job_id, "running", output=text)

    async def _upload_artifacts(self, job_id: int, directory: Path) -> None:
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            async def chunks(path: Path = path) -> AsyncIterator[bytes]:
                async with await trio.open_file(path, "rb") as source:
                    while chunk := await source.read(UPLOAD_CHUNK):
                        yield chunk

            for attempt in range(UPLOAD_TRIES):  # 503: the gateway is busy or restarting; send again
                response = await self.client.post(f"/api/v1/jobs/{job_id}/artifacts", params={"name": path.name},
                                                  content=chunks(), headers=self.headers)
                if response.status_code != 503:
                    break
                await trio.sleep(float(response.headers.get("retry-after", "1")) * (attempt + 1))
            if response.status_code == 409:
                raise LeaseLost(response.json().get("details"))
            response.raise_for_status()

    async def _post_reports(self, job_id: int, directory: Path) -> None:
        for path in sorted(directory.glob("*.json")):
            report = json.loads(path.read_text())
            response = await self.client.post(f"/api/v1/jobs/{job_id}/tests", json=report, headers=self.headers)
            if response.status_code == 409:
                raise LeaseLost(response.json().get("details"))
            response.raise_for_status()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default=os.environ.get("ZLH_RUNNER_TOKEN"), help="or ZLH_RUNNER_TOKEN")
    parser.add_argument("--labels", default=None, help="comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path("runner-work"))
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--max-jobs", type=int, default=None)
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("a runner token is required (--token or ZLH_RUNNER_TOKEN)")
    logging.basicConfig(level=logging.INFO)

    async def serve() -> None:
        async with httpx.AsyncClient(base_url=args.url, timeout=30) as client:
            runner = ReferenceRunner(client, args.token, args.workdir, heartbeat_interval=args.heartbeat,
                                     labels=args.labels.split(",") if args.labels else None)
            await runner.run(max_jobs=args.max_jobs)

    trio.run(serve)


if __name__ == "__main__":
    main()
