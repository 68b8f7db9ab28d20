"""Background service: lapsed leases and dead chains. Every `job_reap_interval` seconds it applies
the lease rule of lifecycle.py (a live job whose lease lapsed is re-queued while attempts remain,
else failed with error "lease expired") and fails queued jobs whose upstream job ended without
success. Set-based updates, so any number of replicas may run it at once."""

from __future__ import annotations

import logging
from typing import Any

import trio

from storage import jobs as job_store
from storage.clock import utcnow

from ..services import Services
from . import lifecycle

log = logging.getLogger("zlh.jobs.reaper")

LEASE_EXPIRED = "lease expired"


def reap_once() -> tuple[int, int, int]:
    """One pass, inside a unit: (re-queued, failed on expiry, failed upstream)."""
    now = utcnow()
    upstream_failed = (lifecycle.FAILED, lifecycle.CANCELLED)
    waiting = lifecycle.sources("upstream_failed")[0]
    if not job_store.reaping_due(now, live_states=lifecycle.sources("requeue"), waiting=waiting,
                                 upstream_failed=upstream_failed):
        return 0, 0, 0
    requeued, failed = job_store.expire_leases(
        now, live_states=lifecycle.sources("requeue"), requeue_to=lifecycle.target("requeue"),
        fail_to=lifecycle.target("expire_final"), requeue_note="[control] lease expired; job re-queued\n",
        fail_note="[control] lease expired; no attempts left\n", error=LEASE_EXPIRED)
    blocked = job_store.fail_blocked_jobs(
        now, waiting=waiting, upstream_failed=upstream_failed,
        fail_to=lifecycle.target("upstream_failed"), error="upstream job failed",
        note="[control] upstream job failed; not run\n")
    return requeued, failed, blocked


def lease_reaper(services: Services) -> Any:
    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        services.running.add("job-lease-reaper")
        task_status.started()
        try:
            while True:
                await trio.sleep(services.settings.job_reap_interval)
                try:
                    with trio.fail_after(30):
                        requeued, failed, blocked = await job_store.run(services.store, reap_once)
                except Exception:  # a bad pass must not stop the service; the next one retries
                    log.exception("lease reaper pass failed")
                    continue
                if requeued or failed or blocked:
                    log.info("leases reaped", extra={"fields": {"requeued": requeued, "failed": failed,
                                                                "upstream_failed": blocked}})
        finally:
            services.running.discard("job-lease-reaper")

    return run
