"""Command line: `python -m bench.agent --data-dir DIR --secret S [...]` runs one reference agent;
`python -m bench.agent --simulate --count N [...]` runs a simulated fleet (see config.py for every
flag). Once listening it prints one JSON line on stdout (`{"port", "idePort", "pid"}` for an agent,
`{"port", "ports", "count", "faulty", "pid"}` for a fleet) and runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from collections.abc import Sequence

import trio

from bench.agent.agent import serve_agent
from bench.agent.config import AgentConfig, FleetConfig, parse_args
from bench.agent.simulator import serve_fleet


def announce(payload: dict[str, object]) -> None:
    print(json.dumps({**payload, "pid": os.getpid()}), flush=True)


def raise_open_file_limit() -> None:
    """A fleet holds a socket per poll in flight (and a listener per agent with --ports-each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(config: AgentConfig | FleetConfig) -> None:
    async with trio.open_nursery() as nursery:
        if isinstance(config, FleetConfig):
            fleet = await nursery.start(serve_fleet, config)
            announce(fleet.describe())
        else:
            ports = await nursery.start(serve_agent, config)
            announce({"port": ports.port, "idePort": ports.ide_port})
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    if isinstance(config, FleetConfig):
        raise_open_file_limit()
    trio.run(run, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
