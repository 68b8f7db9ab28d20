"""`python -m control run` with the local provider, as `make run` starts it: a clean shutdown (SIGINT,
Ctrl-C) leaves no process behind, the keep-running setting leaves the agents for re-adoption, and a
start after `rm -rf data` stops the agents whose directory is gone."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import httpx
import trio

from tests.control.process import Api, GatewayProcess, agent_record, alive, process_env, processes_under


async def _gateway_with_servers(tmp_path: Path, **env: str) -> tuple[GatewayProcess, list[int]]:
    data = tmp_path / "data"
    gateway = GatewayProcess(data, process_env(data, f"sqlite:///{tmp_path}/zlh.db", **env))
    await gateway.start()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        api = Api(client)
        await api.register()
        instances = [await api.provision("game", "game"), await api.provision("dev", "dev")]
    return gateway, [agent_record(data, i["vmid"])["pid"] for i in instances]


async def test_sigint_leaves_no_process_of_the_run(tmp_path: Path) -> None:
    gateway, agents = await _gateway_with_servers(tmp_path)
    try:
        assert all(alive(pid) for pid in agents)
        gateway.signal(signal.SIGINT)
        assert await gateway.wait_exit() == 0
        with trio.fail_after(15):
            while processes_under(tmp_path):
                await trio.sleep(0.1)
        assert not any(alive(pid) for pid in agents)
    finally:
        gateway.kill()
        _kill_left(agents)


async def test_keep_running_setting_leaves_agents_for_readoption(tmp_path: Path) -> None:
    gateway, agents = await _gateway_with_servers(tmp_path, ZLH_LOCAL_STOP_AGENTS_ON_EXIT="0")
    try:
        gateway.signal(signal.SIGINT)
        assert await gateway.wait_exit() == 0
        assert all(alive(pid) for pid in agents)
        default = {k: v for k, v in gateway.env.items() if k != "ZLH_LOCAL_STOP_AGENTS_ON_EXIT"}
        again = GatewayProcess(gateway.data_dir, default)
        await again.start()
        again.signal(signal.SIGTERM)  # the re-adopted agents are now stopped on this clean exit
        assert await again.wait_exit() == 0
        with trio.fail_after(15):
            while any(alive(pid) for pid in agents):
                await trio.sleep(0.1)
    finally:
        gateway.kill()
        _kill_left(agents)


async def test_start_after_data_was_removed_stops_the_orphaned_agents(tmp_path: Path) -> None:
    gateway, agents = await _gateway_with_servers(tmp_path)
    try:
        gateway.kill()  # no clean shutdown: the agents keep running, as after a crash
        assert all(alive(pid) for pid in agents)
        shutil.rmtree(gateway.data_dir)
        fresh = GatewayProcess(gateway.data_dir, gateway.env)
        await fresh.start()
        try:
            with trio.fail_after(15):
                while any(alive(pid) for pid in agents):
                    await trio.sleep(0.1)
        finally:
            fresh.signal(signal.SIGTERM)
            assert await fresh.wait_exit() == 0
    finally:
        _kill_left(agents)


def _kill_left(agents: list[int]) -> None:
    """Never leave a test's agents behind, whatever failed."""
    for pid in agents:
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)  # an agent leads its own session (its game server too)
