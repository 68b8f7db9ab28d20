"""The reference agent's configuration, read once from the command line.

`AgentConfig` configures one real agent (`serve_agent`), `FleetConfig` a simulated fleet
(`serve_fleet`); `parse_args` turns `python -m bench.agent ...` arguments into one of them. Nothing
else reads the environment or argv. It must never start anything.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.agent.faults import FaultSpecError, parse_rule


@dataclass(frozen=True)
class AgentConfig:
    data_dir: Path
    secret: str
    host: str = "127.0.0.1"
    port: int = 0
    ide_port: int = 0
    game_command: str | None = None  # shell-like template; {data} and {files} are filled in
    ready_pattern: str = r"Done \("  # a matching output line means running; "" means at spawn
    log_interval: float = 5.0  # periodic lines of the built-in game server; 0 turns them off
    stop_timeout: float = 10.0  # after the stop command, SIGTERM; SIGKILL 2 s later
    autostart: bool = False
    install_seconds: float = 0.5
    restore_min_seconds: float = 0.3
    console_capacity: int = 5000
    version: str = "1.20.1"
    latest_version: str = "1.20.2"
    codeserver_command: str | None = None  # template with {port} and {data}
    ide_autostart: bool = False


@dataclass(frozen=True)
class FleetConfig:
    count: int
    secret_prefix: str = "sim-secret-"
    host: str = "127.0.0.1"
    port: int = 0
    ports_each: bool = False  # one port per agent instead of one port with /a/<i>/ prefixes
    faults: tuple[str, ...] = ()  # e.g. "latency:0.2@10%", "hang@1%"
    seed: int = 0
    start_seconds: float = 0.5  # a simulated start takes this long to reach running
    initial_state: str = "running"
    players: tuple[str, ...] = field(default=("Steve", "Alex"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.agent",
        description="ZLH reference agent, or (--simulate) a fleet of simulated agents.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    agent = parser.add_argument_group("one real agent")
    agent.add_argument("--data-dir", type=Path)
    agent.add_argument("--secret", help="the bearer secret (visible in ps: prefer --secret-file)")
    agent.add_argument("--secret-file", type=Path, help="read the bearer secret from this file")
    agent.add_argument("--ide-port", type=int, default=0)
    agent.add_argument("--game-command")
    agent.add_argument("--ready-pattern", default=AgentConfig.ready_pattern)
    agent.add_argument("--log-interval", type=float, default=AgentConfig.log_interval)
    agent.add_argument("--stop-timeout", type=float, default=AgentConfig.stop_timeout)
    agent.add_argument("--autostart", action="store_true")
    agent.add_argument("--install-seconds", type=float, default=AgentConfig.install_seconds)
    agent.add_argument("--restore-min-seconds", type=float,
                       default=AgentConfig.restore_min_seconds)
    agent.add_argument("--console-capacity", type=int, default=AgentConfig.console_capacity)
    agent.add_argument("--version", dest="game_version", default=AgentConfig.version)
    agent.add_argument("--latest-version", default=AgentConfig.latest_version)
    agent.add_argument("--codeserver-command")
    agent.add_argument("--ide-autostart", action="store_true")
    fleet = parser.add_argument_group("simulated fleet")
    fleet.add_argument("--simulate", action="store_true")
    fleet.add_argument("--count", type=int, default=1)
    fleet.add_argument("--secret-prefix", default=FleetConfig.secret_prefix)
    fleet.add_argument("--ports-each", action="store_true")
    fleet.add_argument("--fault", action="append", default=[], dest="faults")
    fleet.add_argument("--seed", type=int, default=0)
    fleet.add_argument("--start-seconds", type=float, default=FleetConfig.start_seconds)
    fleet.add_argument("--initial-state", choices=("running", "stopped"),
                       default=FleetConfig.initial_state)
    return parser


def parse_args(argv: Sequence[str]) -> AgentConfig | FleetConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.simulate:
        if args.count < 1:
            parser.error("--count must be at least 1")
        for rule in args.faults:
            try:
                parse_rule(rule)
            except FaultSpecError as exc:
                parser.error(f"--fault {rule}: {exc}")
        return FleetConfig(
            count=args.count, secret_prefix=args.secret_prefix, host=args.host, port=args.port,
            ports_each=args.ports_each, faults=tuple(args.faults), seed=args.seed,
            start_seconds=args.start_seconds, initial_state=args.initial_state)
    if args.secret_file is not None:
        args.secret = args.secret_file.read_text().strip()
    if args.data_dir is None or not args.secret:
        parser.error("--data-dir and --secret or --secret-file are required (or --simulate)")
    return AgentConfig(
        data_dir=args.data_dir, secret=args.secret, host=args.host, port=args.port,
        ide_port=args.ide_port, game_command=args.game_command, ready_pattern=args.ready_pattern,
        log_interval=args.log_interval, stop_timeout=args.stop_timeout, autostart=args.autostart,
        install_seconds=args.install_seconds, restore_min_seconds=args.restore_min_seconds,
        console_capacity=args.console_capacity, version=args.game_version,
        latest_version=args.latest_version, codeserver_command=args.codeserver_command,
        ide_autostart=args.ide_autostart)
