"""Command line of the bench suite: `python -m bench [--quick] [--json FILE] [--plot FILE.png] ...`
(also `zlh-bench` and `make bench`). It starts what the scenarios need on loopback, runs them one
after the other with bounded time and sizes, stops everything it started, and prints the table.

A scenario that fails is reported as failed (with its reason) and the run goes on; the exit status is
1 when any scenario failed, 0 otherwise — missed targets are results, not failures. It must never
leave a process or a temp directory behind (unless `--keep-workdir`).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from bench.harness import RunConfig, open_suite
from bench.nginx import nginx_binary
from bench.report import render_table, write_json, write_plot
from bench.results import ScenarioResult
from bench.scenarios import SCENARIOS, Scenario
from bench.system import CorePlan, core_plan, raise_open_file_limit

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str) -> int:
    match = SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 100MB)")
    return int(float(match.group(1)) * UNITS[(match.group(2) or "b").lower()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="ZLH bench suite: direct to the agent vs through the gateway vs through nginx, "
                    "same machine, same run.")
    parser.add_argument("--quick", action="store_true", help="every scenario, small enough for CI (< ~90 s)")
    parser.add_argument("--only", action="append", default=[], metavar="SCENARIO",
                        help="run only these scenarios (repeatable); see --list")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write machine-readable results")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the comparison chart (matplotlib)")
    parser.add_argument("--size", type=parse_size, help="download/upload size (default 1GiB; quick 64MiB)")
    parser.add_argument("--flat-sizes", type=lambda s: tuple(parse_size(p) for p in s.split(",")),
                        help="sizes for the flat-RSS scenario (default 100MB,1GiB,4GiB; quick 10MiB,100MiB)")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run (default 10; quick 2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--api-servers", type=int, help="servers for GET /api/servers (default 100; quick 20)")
    parser.add_argument("--admin-servers", type=int,
                        help="servers in the admin listing one page is read from (default 10000; quick 500)")
    parser.add_argument("--idle-consoles", type=int, help="open consoles (default 1000; quick 100)")
    parser.add_argument("--fleet", type=lambda s: tuple(int(p) for p in s.split(",")),
                        help="poller fleet sizes to try in order (default 1000,2000,3000,4000; quick 200)")
    parser.add_argument("--cluster-fleet", type=int,
                        help="simulated agents for the 2-replica cluster poller (default 10000; quick 300)")
    parser.add_argument("--poll-interval", type=float, default=5.0, help="poller interval (default 5 s)")
    parser.add_argument("--nginx-keepalive", action="store_true",
                        help="give nginx upstream keep-alive (default off, nginx's default)")
    parser.add_argument("--workdir", type=Path, help="where agents, gateways and nginx keep their files")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the work dir (logs) afterwards")
    return parser


def run_config(args: argparse.Namespace) -> RunConfig:
    quick = bool(args.quick)
    started = time.monotonic()

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    return RunConfig(
        quick=quick,
        transfer_bytes=args.size or (64 << 20 if quick else 1 << 30),
        flat_rss_sizes=args.flat_sizes or ((10 << 20, 100 << 20) if quick else (100 * 10**6, 1 << 30, 4 << 30)),
        wrk_seconds=args.seconds or (2.0 if quick else 10.0),
        wrk_connections=args.connections,
        round_trips=3000 if quick else 50000,
        round_trip_seconds=2.0 if quick else 10.0,
        console_commands=60 if quick else 400,
        ws_bulk_bytes=64 << 20 if quick else 1 << 30,
        api_servers=args.api_servers or (20 if quick else 100),
        admin_servers=args.admin_servers or (500 if quick else 10_000),
        idle_consoles=args.idle_consoles or (100 if quick else 1000),
        fleet_sizes=args.fleet or ((200,) if quick else (1000, 2000, 3000, 4000)),
        cluster_fleet=args.cluster_fleet or (300 if quick else 10000),
        poll_interval=args.poll_interval,
        poll_rounds=1 if quick else 3,
        nginx_keepalive=bool(args.nginx_keepalive),
        progress=progress,
    )


def nginx_version() -> str | None:
    binary = nginx_binary()
    if binary is None:
        return None
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


async def run_scenarios(config: RunConfig, cores: CorePlan, scenarios: list[Scenario],
                        workdir: Path) -> list[ScenarioResult]:
    results: list[ScenarioResult] = []
    config.progress(f"cores: {cores.describe()}")
    async with open_suite(config, cores, workdir) as suite:
        for scenario in scenarios:
            config.progress(f"{scenario.name}: {scenario.measures}")
            started = time.monotonic()
            try:
                result = await scenario.run(suite)
            except Exception as exc:  # noqa: BLE001 — one scenario's failure is reported, the run goes on
                result = ScenarioResult(scenario.name, scenario.name, [], error=f"{type(exc).__name__}: {exc}")
                config.progress(f"  FAILED: {result.error}")
                traceback.print_exc(file=sys.stderr)
            result.seconds = time.monotonic() - started
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for scenario in SCENARIOS:
            print(f"{scenario.name:14} {scenario.measures}")
        return 0
    unknown = set(args.only) - {s.name for s in SCENARIOS}
    if unknown:
        print(f"unknown scenario(s): {', '.join(sorted(unknown))} (see --list)", file=sys.stderr)
        return 2
    scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only]
    missing = [tool for tool in ("curl", "wrk") if shutil.which(tool) is None]
    if missing:
        print(f"missing load generators: {', '.join(missing)} (apt-get install -y {' '.join(missing)}, "
              "or `make bench`)", file=sys.stderr)
        return 2
    raise_open_file_limit()
    cores = core_plan()
    os.sched_setaffinity(0, cores.load)  # this process is a load generator too
    config = run_config(args)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    # Always a fresh directory, also under --workdir: a run never reuses another run's databases.
    workdir = Path(tempfile.mkdtemp(prefix="zlh-bench-", dir=args.workdir))
    started_at = datetime.now(UTC)
    # Other work on a shared machine skews every column; say how busy it was when the run began.
    load_at_start = Path("/proc/loadavg").read_text().split()[0]
    try:
        results = trio.run(run_scenarios, config, cores, scenarios, workdir)
    finally:
        if args.keep_workdir:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    run: dict[str, Any] = {
        "startedAt": started_at.isoformat(timespec="seconds"),
        "quick": config.quick,
        "machine": {"cpus": len(os.sched_getaffinity(0) | cores.proxy), "python": platform.python_version(),
                    "kernel": platform.release(), "nginx": nginx_version(),
                    "loadAverageAtStart": load_at_start},
        "cores": {"proxy": sorted(cores.proxy), "load": sorted(cores.load)},
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
    }
    header = [(f"ZLH bench — {run['startedAt']} — {'quick' if config.quick else 'full'} run — "
               f"{cores.describe()} — nginx {run['machine']['nginx'] or 'not installed'} — "
               f"load average at start {load_at_start}")]
    print(render_table(results, header))
    if args.json:
        write_json(args.json, results, run)
        print(f"\nresults: {args.json}")
    if args.plot:
        problem = write_plot(args.plot, results)
        print(f"\nplot: {problem or args.plot}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
