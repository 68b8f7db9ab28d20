"""The agent poller: the gateway is the single authority on agent state, and this is how it learns it.

Every interval each agent gets `/ready` and `/status`; `/health`, `/version`, `/update` and `/players`
on its first poll and every `slow_every` rounds after (each agent in its own phase), and `/health` at
once whenever `/ready` gets no HTTP answer. Polls are spread evenly over the interval (plus jitter)
so a fleet of thousands never arrives as one burst; concurrency is bounded; each call has a timeout,
so a hung agent costs one timeout and never holds up another agent's poll. An agent that keeps
failing is backed off exponentially (but it is marked not alive at its first failure). Results are
written to storage in batches, one transaction each, so any replica can serve them; Portal reads
never reach an agent. `ready` is stored only from the semantic rule in agent_client.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from storage import instances as store_instances
from storage.clock import utcnow
from storage.db import Store
from storage.instances import PollResult, PollTarget

from .agent_client import (
    AgentClient,
    AgentTarget,
    describe_failure,
    is_agent_ready_result,
)
from .metrics import Metrics

log = logging.getLogger("zlh.poller")


@dataclass
class _AgentSchedule:
    failures: int = 0
    skip_rounds: int = 0
    in_flight: bool = False
    rounds: int = 0
    last_alive: float | None = None  # trio time of the last poll that reached the agent
    since: float = field(default_factory=trio.current_time)


@dataclass
class Poller:
    store: Store
    client: AgentClient
    metrics: Metrics
    interval: float = 5.0
    concurrency: int = 256
    slow_every: int = 12
    flush_every: float = 0.25
    max_backoff_rounds: int = 8
    # Which agents this replica polls; the default polls every agent (replaced when partitioned).
    list_targets: Callable[[], Awaitable[list[PollTarget]]] | None = None
    # When partitioned: whether this replica still owns an agent at the moment its poll is due, so an
    # agent handed to another replica mid-round is not polled here again.
    owns: Callable[[int], bool] | None = None
    # Agents handed to this replica between rounds (`targets_grew`) are polled over this many seconds
    # instead of waiting for the next round: how a dead replica's agents are taken over promptly.
    catch_up_spread: float = 1.0
    _grown: trio.Event = field(default_factory=trio.Event)
    _schedules: dict[int, _AgentSchedule] = field(default_factory=dict)
    _pending: list[PollResult] = field(default_factory=list)
    rounds_completed: int = 0
    last_round_lateness: float = 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limiter = trio.CapacityLimiter(self.concurrency)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_forever)
            nursery.start_soon(self._catch_up_forever, nursery, limiter)
            task_status.started()
            next_round = trio.current_time()
            while True:
                lateness = max(0.0, trio.current_time() - next_round)
                self.last_round_lateness = lateness
                self.metrics.poll_lag.set(lateness)
                await self._round(nursery, limiter, next_round)
                self.rounds_completed += 1
                next_round += self.interval
                next_round = max(next_round, trio.current_time())
                await trio.sleep_until(next_round)

    def agents_late(self) -> int:
        """Agents of this replica without a poll that reached them for 1.5 intervals (/metrics)."""
        bound = trio.current_time() - 1.5 * self.interval
        return sum(1 for s in self._schedules.values()
                   if (s.last_alive if s.last_alive is not None else s.since) < bound)

    def agents_unreachable(self) -> int:
        return sum(1 for s in self._schedules.values() if s.failures > 0)

    def agents_known(self) -> int:
        return len(self._schedules)

    def targets_grew(self) -> None:
        """More agents are this replica's now: poll the new ones before the next round."""
        self._grown.set()

    async def _catch_up_forever(self, nursery: trio.Nursery, limiter: trio.CapacityLimiter) -> None:
        # Alongside the rounds, not between them: a round spreads its polls over most of the interval,
        # and agents gained while it runs (a dead replica's) must not wait for it to end.
        while True:
            await self._grown.wait()
            self._grown = trio.Event()
            await self._round(nursery, limiter, trio.current_time(), only_new=True)

    async def _targets(self) -> list[PollTarget]:
        if self.list_targets is not None:
            return await self.list_targets()
        return await self.store.read(store_instances.poll_targets)

    async def _round(self, nursery: trio.Nursery, limiter: trio.CapacityLimiter, started: float, *,
                     only_new: bool = False) -> None:
        targets = await self._targets()
        live = {t.instance_id for t in targets}
        for gone in set(self._schedules) - live:
            del self._schedules[gone]
        spread = self.interval * 0.8
        if only_new:
            targets = [t for t in targets if t.instance_id not in self._schedules]
            spread = min(spread, self.catch_up_spread)
        for target in targets:  # a round's agents are known at once, so a catch-up never polls them too
            self._schedules.setdefault(target.instance_id, _AgentSchedule())
        count = max(1, len(targets))
        for index, target in enumerate(targets):
            schedule = self._schedules.setdefault(target.instance_id, _AgentSchedule())
            schedule.rounds += 1
            if schedule.in_flight:
                continue
            if schedule.skip_rounds > 0:
                schedule.skip_rounds -= 1
                continue
            due = started + spread * index / count + random.uniform(0, spread / count)
            if due > trio.current_time():
                await trio.sleep_until(due)
            if self.owns is not None and not self.owns(target.instance_id):
                continue
            schedule.in_flight = True
            # An agent's first poll is slow; after that each agent has its own phase in the cycle, so
            # every round carries a twelfth of the slow calls instead of one round carrying them all
            # (measured: a 10,000-agent fleet's synchronized slow round made a thousand polls late).
            slow = schedule.rounds == 1 or (schedule.rounds + target.instance_id) % self.slow_every == 0
            nursery.start_soon(self._poll_one, target, schedule, slow, limiter)

    async def _poll_one(self, target: PollTarget, schedule: _AgentSchedule, slow: bool,
                        limiter: trio.CapacityLimiter) -> None:
        try:
            async with limiter:
                started = trio.current_time()
                result = await self.poll_agent(target, slow)
                self.metrics.poll_duration.observe(trio.current_time() - started)
            self._pending.append(result)
            if result.alive:
                schedule.failures = 0
                schedule.last_alive = trio.current_time()
            else:
                schedule.failures += 1
                # Back off from the second consecutive failure: 1, 2, 4, … rounds skipped.
                if schedule.failures > 1:
                    schedule.skip_rounds = min(self.max_backoff_rounds, 2 ** (schedule.failures - 2))
        finally:
            schedule.in_flight = False

    async def poll_agent(self, target: PollTarget, slow: bool = False) -> PollResult:
        """One poll. `/ready` and `/status` every round; `/health` at the slow cadence and whenever
        `/ready` got no HTTP answer at all. Any HTTP answer proves the agent process is up, so asking
        `/health` too on every round of a healthy agent would spend a third of the poller's CPU to
        learn nothing (measured: 2,000 agents went from late to on time on one core)."""
        agent = AgentTarget(target.host, target.port, target.secret)
        ready = await self.client.get_agent_ready(agent)
        if ready.status == 0 and ready.error == "timeout":
            # A hung agent costs one timeout, not one per route.
            self.metrics.agents_polled.labels("dead").inc()
            return PollResult(target.instance_id, alive=False, ready=False, checked_at=utcnow(),
                              error="/ready: timeout")
        if slow or ready.status == 0:
            health = await self.client.health(agent)
            if health.status != 200:
                self.metrics.agents_polled.labels("dead").inc()
                return PollResult(target.instance_id, alive=False, ready=False, checked_at=utcnow(),
                                  error=f"/health: {describe_failure(health)}")
            if ready.status == 0:  # alive but /ready did not answer this time: ask once more
                ready = await self.client.get_agent_ready(agent)
        status = await self.client.status(agent)
        errors = []
        if not is_agent_ready_result(ready):
            errors.append(f"/ready: {describe_failure(ready)}")
        status_body = status.body if status.ok and isinstance(status.body, dict) else None
        if status_body is None:
            errors.append(f"/status: {describe_failure(status)}")
        details = await self._slow_details(agent) if slow else None
        self.metrics.agents_polled.labels("ready" if is_agent_ready_result(ready) else "not_ready").inc()
        return PollResult(target.instance_id, alive=True, ready=is_agent_ready_result(ready),
                          checked_at=utcnow(), error="; ".join(errors) or None, status=status_body,
                          details=details)

    async def _slow_details(self, agent: AgentTarget) -> dict[str, object]:
        details: dict[str, object] = {}
        # One after another on the agent's one kept connection: asked at once, they would open three
        # connections per agent (measured: a 5,000-agent fleet ran out of descriptors on a slow round).
        version = await self.client.call(agent, "GET", "/version")
        update = await self.client.call(agent, "GET", "/update")
        players = await self.client.call(agent, "GET", "/players")
        if version.ok and isinstance(version.body, dict) and "version" in version.body:
            details["version"] = version.body["version"]
        if update.ok and isinstance(update.body, dict) and "updateAvailable" in update.body:
            details["updateAvailable"] = update.body["updateAvailable"]
        if players.ok and isinstance(players.body, dict) and isinstance(players.body.get("players"), list):
            details["players"] = players.body["players"]
        return details

    async def _flush_forever(self) -> None:
        while True:
            await trio.sleep(self.flush_every)
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await self.store.run(store_instances.record_polls, batch)
        except Exception:
            log.exception("could not record %d poll results", len(batch))
