"""Cluster poller: a simulated fleet (default 10,000 agents) polled by two gateway replicas sharing one
PostgreSQL at the configured interval (5 s by default): is every agent polled on time, and what does it
cost — each replica's CPU and polls/s, PostgreSQL's CPU in all and per replica, transactions/s and
rows updated/s.

The scenario starts its own PostgreSQL 15 (bench/postgres.py: unix socket only, durable defaults), the
simulated fleet (`bench.agent --simulate --ports-each`, in shards: see `agents_per_shard`), and two
replicas (`python -m control run`, DATABASE_URL to that database, distinct ZLH_REPLICA_ID, production
cluster defaults). Once the slot leases have settled (each replica holds its fair share, every slot
held), it inserts one instance row per agent, waits until every agent was polled once, then watches
whole intervals: one full cycle of the poller's slow cadence (`Poller.slow_every` rounds, so the
/health, /version, /update, /players round is in the window once) in a full run, one interval in a
quick one. The fleet is on time when, over the window,
  - the replicas completed ≥ 97% of the polls the window calls for (their `zlh_poller_polls_total`
    summed), and no more than one round's worth beyond 100% (a window of whole intervals still cuts
    rounds at its edges: 102.7% was measured with every slot held once; much more would mean agents
    polled twice);
  - every agent's last poll, read from the database where the Portal reads it, was never older than
    1.5 intervals at any sample, and every agent read alive;
  - at every sample every slot was held by one of the two replicas (an agent is polled by the holder
    of its slot only, so no agent was polled by both or by neither).

Then the takeover: the fleet leader is killed with SIGKILL (no resignation), and the time from the
kill to the next poll of every agent it held is read from the database (each agent's last poll, as
the Portal reads it, sampled every `TAKEOVER_SAMPLE` s); the killed replica is started again (same
id, as a supervisor restarts it), the slots settle, and the next kill follows: `takeover_kills` kills
(3 in a full run, 2 in a quick one), median and worst reported, with the default cluster settings
(lease TTL 3 s, heartbeat 0.5 s); the target is 5 s, half the documented 10 s bound.

Load is read from /proc: each replica's process, the simulator shards, and every PostgreSQL process
(the postmaster's tree). PostgreSQL backends are told apart by application_name: each replica's
DATABASE_URL carries `application_name=zlh-<replica id>` (storage/db.py hands URL query parameters to
psycopg2, so its pool and its LISTEN connection both carry it), the bench's own connections are named
`zlh-bench…`; pg_stat_activity maps every backend pid to its client at every sample. Transactions/s
come from pg_stat_database, rows updated/s from pg_stat_user_tables (deltas over the window).

Nothing is pinned here, unlike the one-gateway scenarios: two replicas, PostgreSQL, the simulator and
the bench share the machine's cores, and any fixed split of five busy processes over two cores would
decide the verdict by the split rather than by the code. The kernel places them; every CPU figure is
per process from /proc, so it does not depend on where a process ran. It must never call the fleet on
time from the poll counters alone, and never leave PostgreSQL or a replica running.
"""

from __future__ import annotations

import os
import secrets
import signal
import statistics
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import trio

from bench.harness import (
    LISTENING,
    REPO,
    START_TIMEOUT,
    Fleet,
    Suite,
    gateway_env,
    insert_instances,
    register,
    running_fleet,
)
from bench.postgres import (
    DatabaseCounters,
    PgCluster,
    backend_roles,
    database_counters,
    postgres_missing,
    running_postgres,
)
from bench.processes import BenchError, Child, running
from bench.results import Metric, ScenarioResult, Target
from bench.scenarios.common import cores_watched
from bench.scenarios.poller_scale import polls_done
from bench.system import (
    CLOCK_TICKS,
    CorePlan,
    core_times,
    cpu_seconds,
    process_tree,
    raise_open_file_limit,
)
from gateway.poller import Poller
from storage import cluster as store_cluster
from storage import instances as store_instances
from storage.db import Store, connect_database

REPLICAS = ("r1", "r2")
DATABASE = "zlh"
ON_TIME_POLL_SHARE = 0.97
STALENESS_INTERVALS = 1.5
SAMPLE_SECONDS = 1.0
SETTLE_TIMEOUT = 60.0  # a replica's slots pass to the next one after the lease TTL (3 s by default)
TAKEOVER_SAMPLE = 0.1  # seconds between reads of the orphaned agents' last polls
TAKEOVER_TIMEOUT = 30.0
TAKEOVER_TARGET = 5.0  # seconds, kill to the last orphaned agent polled again: half the documented bound
SHARD_AGENTS = 5000
FD_HEADROOM = 512


def agents_per_shard(open_file_limit: int) -> int:
    """A simulator shard holds a listening socket and a keep-alive connection per agent (each replica
    keeps its connections to its agents), so about 2 fds per agent: shards of at most 5,000 stay
    within the common 20,000-fd hard limit, and spread the simulator over more than one core."""
    return max(1, min(SHARD_AGENTS, (open_file_limit - FD_HEADROOM) // 2))


def application_name(replica_id: str) -> str:
    """How a replica's PostgreSQL backends are named in pg_stat_activity."""
    return f"zlh-{replica_id}"


@dataclass
class Replica:
    replica_id: str
    child: Child
    url: str


@dataclass(frozen=True)
class RunningCluster:
    """What `measure` started for the window: the bench reads the database through `store` (as the
    Portal reads it) and PostgreSQL's statistics views through `stats` (autocommit)."""

    pg: PgCluster
    stats: Any
    store: Store
    replicas: list[Replica]
    fleets: list[Fleet]
    instance_ids: list[int]


@dataclass(frozen=True)
class Sample:
    """One reading of the database, as the Portal reads it."""

    oldest: float  # seconds since the least recent last poll
    late: frozenset[int]  # instance ids never polled, polled too long ago, or not alive
    never: int
    dead: int
    holders: dict[int, str | None]  # slot → replica


def read_sample(now: datetime, bound: float) -> Sample:
    stored_now = now.astimezone(UTC).replace(tzinfo=None)  # storage keeps naive UTC
    fresh = store_instances.poll_freshness(stored_now - timedelta(seconds=bound))
    oldest = (stored_now - fresh.oldest).total_seconds() if fresh.oldest is not None else 0.0
    return Sample(oldest, frozenset(fresh.late), fresh.never, fresh.dead, store_cluster.slot_holders())


def partition_problem(holders: dict[int, str | None], replica_ids: tuple[str, ...]) -> str | None:
    """Why the slots are not split between the replicas (None when every slot has one of them)."""
    unheld = sorted(slot for slot, holder in holders.items() if holder is None)
    if unheld:
        return f"{len(unheld)} slot(s) held by no replica (e.g. slot {unheld[0]})"
    strangers = sorted({str(h) for h in holders.values()} - set(replica_ids))
    if strangers:
        return f"slots held by unknown replica(s) {', '.join(strangers)}"
    return None


def fair_split(holders: dict[int, str | None], replica_ids: tuple[str, ...]) -> bool:
    held = Counter(holders.values())
    shares = [held.get(r, 0) for r in replica_ids]
    return bool(holders) and partition_problem(holders, replica_ids) is None and max(shares) - min(shares) <= 1


class ProcessCpu:
    """CPU seconds of processes that come and go during a window, by role. Every pid is read at every
    sample (CPU time only grows, so the largest reading is the last); a pid first seen after the window
    began counts from zero, one that exits keeps its last reading (at most one sample's CPU is lost)."""

    def __init__(self, roles: dict[int, str]) -> None:
        self.roles = dict(roles)
        self.first = {pid: cpu_seconds([pid]) for pid in roles}
        self.last = dict(self.first)

    def sample(self, roles: dict[int, str]) -> None:
        for pid, role in roles.items():
            if pid not in self.first:
                self.first[pid] = 0.0
            self.roles[pid] = role
            self.last[pid] = max(self.last.get(pid, 0.0), cpu_seconds([pid]))

    def by_role(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid, role in self.roles.items():
            totals[role] = totals.get(role, 0.0) + self.last[pid] - self.first[pid]
        return totals


def postgres_roles(pg: PgCluster, conn: Any) -> dict[int, str]:
    """Every PostgreSQL process of the cluster with its role (the postmaster and anything not yet in
    pg_stat_activity as "postmaster")."""
    roles = backend_roles(conn)
    return {pid: roles.get(pid, "postmaster") for pid in process_tree(pg.postmaster_pid())}


async def start_replica(stack: AsyncExitStack, suite: Suite, pg: PgCluster, replica_id: str,
                        jwt_secret: str, cores: frozenset[int]) -> Replica:
    data_dir = suite.workdir / f"cluster-{replica_id}-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**gateway_env(data_dir, suite.config.poll_interval), "JWT_SECRET": jwt_secret,
           "ZLH_REPLICA_ID": replica_id,
           "DATABASE_URL": pg.url(DATABASE, application_name=application_name(replica_id))}
    argv = [sys.executable, "-m", "control", "run", "--port", "0"]
    child = await stack.enter_async_context(
        running(f"cluster-{replica_id}", argv, cores=cores, log_dir=suite.workdir, env=env, cwd=REPO))
    url = await child.wait_for_line(lambda line: (m := LISTENING.search(line)) and m.group(1), START_TIMEOUT)
    return Replica(replica_id, child, str(url))


async def wait_settled(store: Store, replica_ids: tuple[str, ...]) -> None:
    """Until the slot leases are split fairly between the replicas (a later replica gets its share
    once the first one's excess leases lapse)."""
    with trio.move_on_after(SETTLE_TIMEOUT):
        while True:
            if fair_split(await store.read(store_cluster.slot_holders), replica_ids):
                return
            await trio.sleep(0.5)
    holders = await store.read(store_cluster.slot_holders)
    raise BenchError(f"the replicas did not split the slots within {SETTLE_TIMEOUT:.0f}s: "
                     f"{dict(Counter(holders.values()))}")


def check_running(children: list[Child]) -> None:
    for child in children:
        if child.process.poll() is not None:
            raise BenchError(f"{child.name} exited during the scenario:\n{child.tail()}")


async def cluster_poller(suite: Suite) -> ScenarioResult:
    count, interval = suite.config.cluster_fleet, suite.config.poll_interval
    metrics = [Metric("on_time", "agents polled on time (all or none)", "agents", True),
               Metric("poll_share", "polls done of those due", "%", True),
               Metric("oldest_poll", "oldest last poll at any sample", "s", False),
               Metric("late_agents", "agents late, unpolled or down at a sample", "agents", False)]
    for r in REPLICAS:
        metrics += [Metric(f"cpu_{r}", f"replica {r} CPU", "% core", False),
                    Metric(f"polls_{r}", f"replica {r} polls", "polls/s", True)]
    metrics.append(Metric("pg_cpu", "PostgreSQL CPU, all processes", "% core", False))
    metrics += [Metric(f"pg_cpu_{r}", f"PostgreSQL backends of replica {r}", "% core", False) for r in REPLICAS]
    metrics += [Metric("pg_tx", "PostgreSQL transactions", "tx/s", False),
                Metric("pg_rows_updated", "PostgreSQL rows updated", "rows/s", False),
                Metric("simulator_cpu", "simulated fleet CPU", "% core", False),
                Metric("takeover_median", "takeover after kill -9, median", "s", False),
                Metric("takeover_worst", "takeover after kill -9, worst", "s", False)]
    targets = [Target("takeover_worst", f"≤ {TAKEOVER_TARGET:.0f} s (default settings)", None, TAKEOVER_TARGET,
                      False)]
    if not suite.config.quick:
        targets.insert(0, Target("on_time", f"all {count:,} polled on time", None, float(count), True))
    result = ScenarioResult("cluster_poller", f"{count:,} agents, {len(REPLICAS)} replicas, one PostgreSQL, "
                            f"{interval:.0f} s interval", metrics, targets)
    reason = "gateway-only scenario (the poller lives in the gateway replicas)"
    result.skip("direct", reason)
    result.skip("nginx", reason)
    problem = postgres_missing()
    if problem is not None:
        raise BenchError(problem)
    await measure(suite, result, count, interval)
    if suite.config.quick:
        result.notes.append(f"quick run: {count} agents, one interval; the fleet-size target is judged "
                            "in a full run")
    return result


async def measure(suite: Suite, result: ScenarioResult, count: int, interval: float) -> None:
    everywhere = suite.cores.proxy | suite.cores.load
    unpinned = CorePlan(everywhere, everywhere)  # see the module docstring: the kernel places them
    per_shard = agents_per_shard(raise_open_file_limit())
    async with AsyncExitStack() as stack:
        suite.progress("  starting PostgreSQL 15 (unix socket, durable defaults)")
        pg = await stack.enter_async_context(running_postgres(max_connections=100))
        await trio.to_thread.run_sync(pg.admin_sql, f"CREATE DATABASE {DATABASE}")
        shards = [min(per_shard, count - start) for start in range(0, count, per_shard)]
        suite.progress(f"  starting {count:,} simulated agents ({len(shards)} simulator process(es))")
        fleets: list[Fleet] = []
        for index, size in enumerate(shards):
            fleets.append(await stack.enter_async_context(
                running_fleet(suite.workdir, unpinned, size, name=f"cluster-fleet-{index}")))
        suite.progress(f"  starting replicas {', '.join(REPLICAS)}")
        jwt_secret = secrets.token_urlsafe(48)
        replicas = [await start_replica(stack, suite, pg, r, jwt_secret, everywhere) for r in REPLICAS]
        store = Store(connect_database(pg.url(DATABASE, application_name="zlh-bench"), max_connections=2),
                      threads=1)
        stack.callback(store.close)
        stats = await trio.to_thread.run_sync(lambda: pg.connect(DATABASE, application_name="zlh-bench-stats"))
        stack.callback(stats.close)
        await wait_settled(store, REPLICAS)
        session = await register(suite.http, replicas[0].url, "cluster@example.com")
        rows = [row for fleet in fleets for row in fleet.rows()]
        suite.progress(f"  inserting {len(rows):,} instance rows")
        instance_ids = await store.run(insert_instances, session.user_id, rows, "cluster")
        bound = STALENESS_INTERVALS * interval
        with trio.move_on_after(interval * 4 + 10):
            while (await store.read(read_sample, datetime.now(UTC), bound)).never:
                await trio.sleep(SAMPLE_SECONDS)
        children = [*(f.child for f in fleets), *(r.child for r in replicas)]
        check_running(children)
        running_cluster = RunningCluster(pg, stats, store, replicas, fleets, instance_ids)
        await watch(suite, result, running_cluster, count, interval)
        check_running(children)
        kills = 2 if suite.config.quick else 3
        times = await takeovers(suite, stack, running_cluster, jwt_secret, everywhere, kills)
        result.record("gateway", "takeover_median", statistics.median(times))
        result.record("gateway", "takeover_worst", max(times))
        result.notes.append(
            f"takeover: {len(times)} kill(s) -9 of the fleet leader, kill to the next poll of every agent it held "
            f"(read from the database every {TAKEOVER_SAMPLE:.1f} s): {', '.join(f'{t:.2f}' for t in times)} s; "
            f"default cluster settings (lease TTL 3 s, heartbeat 0.5 s), interval {interval:.0f} s")


async def takeovers(suite: Suite, stack: AsyncExitStack, cluster: RunningCluster, jwt_secret: str,
                    cores: frozenset[int], kills: int) -> list[float]:
    """Kill the fleet leader `kills` times (restarting it in between); each kill's takeover time."""
    store, times = cluster.store, []
    for kill in range(kills):
        await wait_settled(store, REPLICAS)
        holders = await store.read(store_cluster.slot_holders)
        leader = await store.read(store_cluster.lease_holder) or REPLICAS[0]
        [victim] = [r for r in cluster.replicas if r.replica_id == leader]
        orphaned = {i for i in cluster.instance_ids if holders.get(i % len(holders)) == leader}
        suite.progress(f"  kill -9 {leader} ({kill + 1}/{kills}): {len(orphaned):,} agents to take over")
        killed_at = datetime.now(UTC)
        started = trio.current_time()
        os.kill(victim.child.pid, signal.SIGKILL)
        cutoff = killed_at.replace(tzinfo=None)  # storage keeps naive UTC
        with trio.move_on_after(TAKEOVER_TIMEOUT):
            while True:
                fresh = await store.read(store_instances.poll_freshness, cutoff)
                if not orphaned & set(fresh.late):
                    break
                await trio.sleep(TAKEOVER_SAMPLE)
        took = trio.current_time() - started
        if took >= TAKEOVER_TIMEOUT:
            raise BenchError(f"the agents of {leader} were not polled again within {TAKEOVER_TIMEOUT:.0f}s")
        times.append(took)
        suite.progress(f"  taken over in {took:.2f} s; restarting {leader}")
        replacement = await start_replica(stack, suite, cluster.pg, leader, jwt_secret, cores)
        cluster.replicas[cluster.replicas.index(victim)] = replacement
    return times


@dataclass
class Watched:
    """What the samples of a window saw, as the Portal would have."""

    oldest: float = 0.0
    never: int = 0
    dead: int = 0
    late: set[int] = field(default_factory=set)
    partition: list[str] = field(default_factory=list)  # one problem per sample that had one
    first_holders: dict[int, str | None] | None = None
    holders: dict[int, str | None] = field(default_factory=dict)
    handovers: int = 0  # slots whose holder differs from the window's first sample

    def add(self, sample: Sample) -> None:
        self.oldest = max(self.oldest, sample.oldest)
        self.never, self.dead = max(self.never, sample.never), max(self.dead, sample.dead)
        self.late |= sample.late
        problem = partition_problem(sample.holders, REPLICAS)
        if problem is not None:
            self.partition.append(problem)
        if self.first_holders is None:
            self.first_holders = dict(sample.holders)
        self.holders = sample.holders
        moved = sum(1 for slot, holder in sample.holders.items() if self.first_holders.get(slot) != holder)
        self.handovers = max(self.handovers, moved)


@dataclass(frozen=True)
class Readings:
    """Cumulative counters read at one moment: the window's figures are the differences."""

    at: float
    polls: dict[str, float]  # replica id → completed polls (its /metrics)
    replica_cpu: dict[str, float]  # replica id → CPU seconds
    fleet_cpu: float
    bench_cpu: float
    busy_ticks: int  # all cores
    database: DatabaseCounters


async def read_counters(suite: Suite, stats: Any, replicas: list[Replica], fleet_pids: list[int]) -> Readings:
    database = await trio.to_thread.run_sync(database_counters, stats)
    polls = {r.replica_id: await polls_done(suite.http, r.url) for r in replicas}
    return Readings(time.monotonic(), polls,
                    {r.replica_id: cpu_seconds(process_tree(r.child.pid)) for r in replicas},
                    cpu_seconds(fleet_pids), cpu_seconds([os.getpid()]), sum(core_times().busy.values()),
                    database)


async def watch(suite: Suite, result: ScenarioResult, cluster: RunningCluster, count: int,
                interval: float) -> None:
    rounds = 1 if suite.config.quick else Poller.slow_every
    bound = STALENESS_INTERVALS * interval
    suite.progress(f"  watching {rounds} interval(s) ({interval * rounds:.0f} s)")
    fleet_pids = [pid for f in cluster.fleets for pid in process_tree(f.child.pid)]
    pg, stats = cluster.pg, cluster.stats
    pg_cpu = ProcessCpu(await trio.to_thread.run_sync(postgres_roles, pg, stats))
    before = await read_counters(suite, stats, cluster.replicas, fleet_pids)
    watched = Watched()
    async with cores_watched(result):
        while time.monotonic() - before.at < interval * rounds:
            await trio.sleep(SAMPLE_SECONDS)
            watched.add(await cluster.store.read(read_sample, datetime.now(UTC), bound))
            pg_cpu.sample(await trio.to_thread.run_sync(postgres_roles, pg, stats))
    after = await read_counters(suite, stats, cluster.replicas, fleet_pids)
    pg_cpu.sample(await trio.to_thread.run_sync(postgres_roles, pg, stats))
    report(suite, result, cluster, count, interval, watched, before, after, pg_cpu)


def report(suite: Suite, result: ScenarioResult, cluster: RunningCluster, count: int, interval: float,
           watched: Watched, before: Readings, after: Readings, pg_cpu: ProcessCpu) -> None:
    elapsed = after.at - before.at
    bound = STALENESS_INTERVALS * interval
    polls = {r: after.polls[r] - before.polls[r] for r in before.polls}
    replica_cpu = {r: (after.replica_cpu[r] - before.replica_cpu[r]) / elapsed for r in before.replica_cpu}
    fleet_cpu = (after.fleet_cpu - before.fleet_cpu) / elapsed
    bench_cpu = (after.bench_cpu - before.bench_cpu) / elapsed
    machine_busy = (after.busy_ticks - before.busy_ticks) / CLOCK_TICKS / elapsed
    pg_by_role = {role: seconds / elapsed for role, seconds in pg_cpu.by_role().items()}
    pg_total = sum(pg_by_role.values())
    updated = after.database.rows_updated_since(before.database)
    expected = count * elapsed / interval
    total_polls = sum(polls.values())
    one_round_more = 1 + interval / elapsed
    on_time = (ON_TIME_POLL_SHARE * expected <= total_polls <= one_round_more * expected
               and watched.oldest <= bound and watched.never == 0 and watched.dead == 0
               and not watched.partition)

    result.record("gateway", "on_time", float(count) if on_time else 0.0)
    result.record("gateway", "poll_share", 100 * total_polls / expected)
    result.record("gateway", "oldest_poll", watched.oldest)
    result.record("gateway", "late_agents", float(len(watched.late)))
    for replica in cluster.replicas:
        r = replica.replica_id
        result.record("gateway", f"cpu_{r}", 100 * replica_cpu[r])
        result.record("gateway", f"polls_{r}", polls[r] / elapsed)
        result.record("gateway", f"pg_cpu_{r}", 100 * pg_by_role.get(application_name(r), 0.0))
    result.record("gateway", "pg_cpu", 100 * pg_total)
    result.record("gateway", "pg_tx", (after.database.transactions - before.database.transactions) / elapsed)
    result.record("gateway", "pg_rows_updated", sum(updated.values()) / elapsed)
    result.record("gateway", "simulator_cpu", 100 * fleet_cpu)

    verdict = "on time" if on_time else "LATE"
    suite.progress(f"  {count:,} agents: {verdict} — {total_polls:,.0f}/{expected:,.0f} polls, oldest poll "
                   f"{watched.oldest:.1f} s, replicas "
                   f"{', '.join(f'{r} {cpu:.0%}' for r, cpu in replica_cpu.items())} of a core, "
                   f"PostgreSQL {pg_total:.0%}")
    result.notes.append(
        f"{verdict.lower()}: {total_polls:,.0f} of {expected:,.0f} due polls over {elapsed:.1f} s, oldest last "
        f"poll {watched.oldest:.1f} s (bound {bound:.1f} s), {len(watched.late):,} agent(s) late, unpolled or "
        f"down at some sample ({watched.never} never polled, {watched.dead} not alive at worst)")
    slot_count = max(1, len(watched.holders))
    owned = Counter(watched.holders.get(i % slot_count) for i in cluster.instance_ids)
    split = "; ".join(
        f"{r} {polls[r]:,.0f} polls ({_percent(polls[r], total_polls)}) for the {owned.get(r, 0):,} agents "
        f"of its {sum(1 for h in watched.holders.values() if h == r)} slots "
        f"({_percent(polls[r], owned.get(r, 0) * elapsed / interval)} of their due polls)" for r in polls)
    problems = (f"; partition problems in {len(watched.partition)} sample(s), e.g. {watched.partition[0]}"
                if watched.partition else "")
    result.notes.append(f"split: {split}; {watched.handovers} slot(s) changed hands during the window{problems}")
    roles = ", ".join(f"{role or '(unnamed)'} {share:.1%}" for role, share in
                      sorted(pg_by_role.items(), key=lambda item: -item[1]) if share >= 0.0005)
    result.notes.append(f"PostgreSQL CPU by process role (backends by application_name, set in each replica's "
                        f"DATABASE_URL): {roles or 'none measurable'}; zlh-bench* are the bench's own sampling")
    tables = ", ".join(f"{table} {rows / elapsed:,.0f}/s" for table, rows in
                       sorted(updated.items(), key=lambda item: -item[1]) if rows)
    result.notes.append(f"rows updated by table: {tables or 'none'}; transactions include the bench's "
                        f"~{2 / SAMPLE_SECONDS:.0f}/s sampling reads")
    measured = sum(replica_cpu.values()) + pg_total + fleet_cpu + bench_cpu
    result.notes.append(f"unpinned (the kernel places every process); the machine was busy {machine_busy:.0%} "
                        f"of a core over the window: replicas, PostgreSQL, simulator and the bench's sampling "
                        f"({bench_cpu:.0%}) {measured:.0%}, everything else (other work on the machine, the "
                        f"idle suite) {machine_busy - measured:.0%}")


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "—"
