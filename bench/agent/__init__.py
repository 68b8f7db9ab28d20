"""The ZLH reference agent and agent simulator (the contract is docs/agent-contract.md).

Programmatic use inside a trio nursery:

    ports = await nursery.start(serve_agent, AgentConfig(data_dir=..., secret=...))
    fleet = await nursery.start(serve_fleet, FleetConfig(count=100, faults=("hang@1%",)))

Command line: `python -m bench.agent --help`.
"""

from bench.agent.agent import AgentPorts, serve_agent
from bench.agent.config import AgentConfig, FleetConfig
from bench.agent.simulator import Fleet, serve_fleet

__all__ = ["AgentConfig", "AgentPorts", "Fleet", "FleetConfig", "serve_agent", "serve_fleet"]
