"""The simulated fleet: per-agent secrets, lifecycle, and injected faults seen from a real client."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from bench.agent import Fleet, FleetConfig, serve_fleet
from bench.agent.faults import FaultSpecError, assign_faults, parse_rule

REPO_ROOT = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def fleet_of(config: FleetConfig) -> AsyncIterator[tuple[Fleet, httpx.AsyncClient]]:
    async with trio.open_nursery() as nursery:
        fleet = await nursery.start(serve_fleet, config)
        async with httpx.AsyncClient(timeout=2.0) as client:
            yield fleet, client
        nursery.cancel_scope.cancel()


def auth(fleet: Fleet, index: int) -> dict[str, str]:
    return {"authorization": f"Bearer {fleet.secret(index)}"}


@pytest.mark.trio
async def test_each_simulated_agent_has_its_own_secret_and_state() -> None:
    async with fleet_of(FleetConfig(count=5, start_seconds=0.2)) as (fleet, client):
        ready = await client.get(f"{fleet.url(3)}/ready", headers=auth(fleet, 3))
        assert ready.json() == {"ready": True, "state": "running"}
        wrong = await client.get(f"{fleet.url(3)}/ready", headers=auth(fleet, 2))
        assert wrong.status_code == 401 and wrong.json()["error"] == "UNAUTHORIZED"
        assert (await client.get(f"http://127.0.0.1:{fleet.port}/a/99/health")).status_code == 404
        status = (await client.get(f"{fleet.url(1)}/status", headers=auth(fleet, 1))).json()
        assert status["state"] == "running" and status["playerCount"] == 2
        assert set(status) >= {"players", "version", "updateAvailable", "resources", "operations"}

        stop = await client.post(f"{fleet.url(1)}/stop", headers=auth(fleet, 1))
        assert stop.json() == {"state": "stopping"}
        assert (await client.post(f"{fleet.url(1)}/stop", headers=auth(fleet, 1))
                ).status_code == 409
        await trio.sleep(0.25)
        assert (await client.get(f"{fleet.url(1)}/status", headers=auth(fleet, 1))
                ).json()["state"] == "stopped"
        command = await client.post(f"{fleet.url(1)}/console/command", headers=auth(fleet, 1),
                                    json={"command": "say hi"})
        assert command.status_code == 409
        assert (await client.post(f"{fleet.url(1)}/start", headers=auth(fleet, 1))
                ).json() == {"state": "starting"}
        other = await client.get(f"{fleet.url(0)}/status", headers=auth(fleet, 0))
        assert other.json()["state"] == "running"


@pytest.mark.trio
async def test_runtime_faults_hang_garbage_notready_error_reset_and_recovery() -> None:
    async with fleet_of(FleetConfig(count=6)) as (fleet, client):
        fleet.set_fault(1, "hang")
        fleet.set_fault(2, "garbage")
        fleet.set_fault(3, "notready")
        fleet.set_fault(4, "error500")
        fleet.set_fault(5, "reset")
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"{fleet.url(1)}/ready", headers=auth(fleet, 1), timeout=0.3)
        garbage = await client.get(f"{fleet.url(2)}/ready", headers=auth(fleet, 2))
        assert garbage.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(garbage.content)
        notready = await client.get(f"{fleet.url(3)}/ready", headers=auth(fleet, 3))
        assert notready.status_code == 200 and notready.json()["ready"] is False
        assert (await client.get(f"{fleet.url(3)}/health", headers=auth(fleet, 3))
                ).status_code == 200
        failing = await client.get(f"{fleet.url(4)}/status", headers=auth(fleet, 4))
        assert failing.status_code == 500 and failing.json()["error"] == "INTERNAL"
        with pytest.raises(httpx.TransportError):
            await client.get(f"{fleet.url(5)}/health", headers=auth(fleet, 5))
        healthy = await client.get(f"{fleet.url(0)}/ready", headers=auth(fleet, 0))
        assert healthy.json()["ready"] is True

        fleet.set_fault(1, None)
        recovered = await client.get(f"{fleet.url(1)}/ready", headers=auth(fleet, 1))
        assert recovered.json()["ready"] is True
        fleet.set_fault(1, "latency:0.3")
        with trio.move_on_after(5):
            started = trio.current_time()
            await client.get(f"{fleet.url(1)}/health", headers=auth(fleet, 1))
            assert trio.current_time() - started >= 0.3


@pytest.mark.trio
async def test_flapping_agent_alternates_between_answering_and_resetting() -> None:
    config = FleetConfig(count=1, ports_each=True, faults=("flap:0.4",))
    async with fleet_of(config) as (fleet, client):
        assert fleet.ports and fleet.url(0) == f"http://127.0.0.1:{fleet.ports[0]}"
        assert (await client.get(f"{fleet.url(0)}/health", headers=auth(fleet, 0))
                ).status_code == 200
        await trio.sleep(0.45)
        with pytest.raises(httpx.TransportError):
            await client.get(f"{fleet.url(0)}/health", headers=auth(fleet, 0))
        await trio.sleep(0.4)
        assert (await client.get(f"{fleet.url(0)}/health", headers=auth(fleet, 0))
                ).status_code == 200


def test_fault_rules_pick_an_exact_reproducible_share_of_agents() -> None:
    rules = [parse_rule("hang@1%"), parse_rule("latency:0.2@10%"), parse_rule("notready")]
    first = assign_faults(rules, 1000, seed=7)
    assert first == assign_faults(rules, 1000, seed=7)
    assert sum(any(f.kind == "hang" for f in faults) for faults in first) == 10
    assert sum(any(f.kind == "latency" for f in faults) for faults in first) == 100
    assert all(any(f.kind == "notready" for f in faults) for faults in first)
    for bad in ["explode@1%", "latency@5%", "hang:3", "flap:0", "hang@200%"]:
        with pytest.raises(FaultSpecError):
            parse_rule(bad)


def test_command_line_prints_its_ports_as_one_json_line(tmp_path: Path) -> None:
    for arguments in (["--simulate", "--count", "3", "--fault", "garbage@34%"],
                      ["--data-dir", str(tmp_path / "cli-agent"), "--secret", "s"]):
        process = subprocess.Popen([sys.executable, "-m", "bench.agent", *arguments],
                                   stdout=subprocess.PIPE, cwd=REPO_ROOT, text=True)
        try:
            assert process.stdout is not None
            announced = json.loads(process.stdout.readline())
            assert announced["port"] > 0 and announced["pid"] == process.pid
            headers = {"authorization": "Bearer " + ("sim-secret-2" if "--simulate" in arguments
                                                     else "s")}
            url = (f"http://127.0.0.1:{announced['port']}/a/2/health" if "--simulate" in arguments
                   else f"http://127.0.0.1:{announced['port']}/health")
            if "--simulate" in arguments:
                assert announced["count"] == 3 and len(announced["faulty"]) == 1
            else:
                assert announced["idePort"] > 0
            answer = httpx.get(url, headers=headers, timeout=5)
            assert answer.status_code == 200
        finally:
            process.terminate()
            assert process.wait(timeout=10) == 0
