"""Poller scale: the largest simulated fleet one gateway process polls on time at the configured
interval (5 s by default), and the gateway's CPU per 1,000 agents.

Each step starts a fresh gateway (proxy core) and a fresh simulated fleet with one port per agent
(load cores), inserts one instance row per simulated agent, waits until every agent was polled once,
then watches a window of whole intervals. A step is "on time" when the gateway completed at least
97% of the polls the window calls for, every agent was polled within 1.5 intervals at every sample,
and every agent reads alive. Steps grow until one is late. It must never call a step on time from
the poll counter alone: staleness is read back from storage, where the Portal reads it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx
import trio

from bench.harness import (
    Suite,
    insert_instances,
    register,
    running_fleet,
    running_gateway,
)
from bench.processes import BenchError
from bench.results import Metric, ScenarioResult, Target
from bench.scenarios.common import cores_watched
from bench.system import cpu_seconds
from storage import instances as store_instances

ON_TIME_POLL_SHARE = 0.97
STALENESS_INTERVALS = 1.5
SAMPLE_SECONDS = 1.0


def staleness(now: datetime) -> tuple[float, int, int]:
    """(the oldest poll's age in seconds, agents never polled, agents not alive), read from storage."""
    stored_now = now.astimezone(UTC).replace(tzinfo=None)  # storage keeps naive UTC
    fresh = store_instances.poll_freshness(stored_now)
    oldest = (stored_now - fresh.oldest).total_seconds() if fresh.oldest is not None else 0.0
    return oldest, fresh.never, fresh.dead


async def polls_done(http: httpx.AsyncClient, gateway_url: str) -> float:
    """A gateway's completed polls so far (all outcomes), from its /metrics."""
    response = await http.get(f"{gateway_url}/metrics")
    total = 0.0
    for line in response.text.splitlines():
        if line.startswith("zlh_poller_polls_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def measure_step(suite: Suite, result: ScenarioResult, count: int) -> dict[str, float]:
    interval = suite.config.poll_interval
    async with running_fleet(suite.workdir, suite.cores, count) as fleet, \
            running_gateway(suite.workdir, suite.cores, name=f"poller-gateway-{count}",
                            poll_interval=interval) as gateway:
        session = await register(suite.http, gateway.url, "poller@example.com")
        await gateway.storage(insert_instances, session.user_id, fleet.rows(), "sim")
        # Every agent polled once (the first round may have started before the rows existed).
        with trio.move_on_after(interval * 4 + 10):
            while True:
                _oldest, never, _dead = await gateway.storage(staleness, datetime.now(UTC))
                if never == 0:
                    break
                await trio.sleep(SAMPLE_SECONDS)
        window = interval * suite.config.poll_rounds
        pids = gateway.pids()
        polls_before = await polls_done(suite.http, gateway.url)
        cpu_before, started = cpu_seconds(pids), time.monotonic()
        worst, never, dead = 0.0, 0, 0
        async with cores_watched(result):
            while time.monotonic() - started < window:
                await trio.sleep(SAMPLE_SECONDS)
                oldest, never_now, dead_now = await gateway.storage(staleness, datetime.now(UTC))
                worst, never, dead = max(worst, oldest), max(never, never_now), max(dead, dead_now)
        elapsed = time.monotonic() - started
        cpu_share = (cpu_seconds(pids) - cpu_before) / elapsed
        polls = await polls_done(suite.http, gateway.url) - polls_before
        if fleet.child.process.poll() is not None:
            raise BenchError(f"the simulated fleet exited during the step:\n{fleet.child.tail()}")
    expected = count * elapsed / interval
    on_time = (polls >= ON_TIME_POLL_SHARE * expected and worst <= STALENESS_INTERVALS * interval
               and never == 0 and dead == 0)
    suite.progress(f"  {count} agents: {'on time' if on_time else 'LATE'} — {polls:,.0f}/{expected:,.0f} polls, "
                   f"oldest poll {worst:.1f} s, gateway CPU {cpu_share:.0%} of a core")
    result.notes.append(f"{count} agents: {'on time' if on_time else 'late'}; {polls:,.0f} of {expected:,.0f} "
                        f"polls, oldest poll {worst:.1f} s, {never} never polled, {dead} not alive, "
                        f"gateway CPU {cpu_share:.0%} of one core")
    return {"on_time": float(on_time), "cpu_share": cpu_share}


async def poller_scale(suite: Suite) -> ScenarioResult:
    interval = suite.config.poll_interval
    targets = [] if suite.config.quick else [
        Target("largest_on_time", "≥ 2,000 agents", None, 2000.0, True)]
    result = ScenarioResult("poller", f"poller scale at a {interval:.0f} s interval", [
        Metric("largest_on_time", "largest fleet polled on time", "agents", True),
        Metric("cpu_per_1000", "gateway CPU per 1,000 agents", "% core", False)], targets)
    reason = "gateway-only scenario (the poller lives in the gateway)"
    result.skip("direct", reason)
    result.skip("nginx", reason)
    largest = 0
    cpu_per_1000 = float("nan")
    for count in suite.config.fleet_sizes:
        step = await measure_step(suite, result, count)
        if not step["on_time"]:
            break
        largest, cpu_per_1000 = count, step["cpu_share"] * 100 * 1000 / count
    result.record("gateway", "largest_on_time", float(largest))
    result.record("gateway", "cpu_per_1000", cpu_per_1000)
    if suite.config.quick:
        result.notes.append("quick run: one small step only; the ≥ 2,000-agent target is judged in a full run")
    return result
