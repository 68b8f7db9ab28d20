"""The poller against a real simulated fleet (real sockets) and real agents: semantic readiness,
faults, and a hung agent costing one timeout rather than a stuck poller."""

from __future__ import annotations

import pytest
import trio

from bench.agent.config import FleetConfig
from bench.agent.simulator import serve_fleet
from control.config import Settings
from storage import instances as store_instances
from storage.db import connect_database
from storage.models import AgentState, Instance, User
from tests.conftest import Gateway
from tests.dataplane.helpers import kill_agent

FLEET = 4


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.agent_timeout = 1.0
    return settings


async def _fleet_servers(gateway: Gateway, nursery: trio.Nursery) -> tuple[object, dict, list[int]]:
    fleet = await nursery.start(serve_fleet, FleetConfig(count=FLEET, ports_each=True, start_seconds=0.05))
    session = await gateway.register("fleet@example.com")
    db = connect_database(gateway.settings.database_url)
    ids = []
    with db.connection_context(), db.bind_ctx([Instance, AgentState, User]):
        for i in range(FLEET):
            instance = store_instances.create_instance(
                vmid=5000 + i, owner=session["user"]["id"], kind="game", name=f"sim-{i}", engine_type="sim",
                provider="sim", agent_host="127.0.0.1", agent_port=fleet.ports[i], agent_secret=fleet.secret(i),
                state="ready")
            ids.append(instance.id)
    return fleet, session, ids


async def _server(gateway: Gateway, session: dict, sid: int) -> dict:
    return (await gateway.client.get(f"/api/servers/{sid}", headers=gateway.bearer(session))).json()


async def test_faults_are_recorded_and_never_read_as_ready(gateway: Gateway, nursery: trio.Nursery) -> None:
    fleet, session, ids = await _fleet_servers(gateway, nursery)
    for sid in ids:
        await gateway.wait_for(lambda b: b["agentReady"] and b["agent"]["alive"], f"/api/servers/{sid}", session)
    fleet.set_fault(1, "notready")
    fleet.set_fault(2, "garbage")
    fleet.set_fault(3, "hang")
    interval = gateway.settings.poll_interval
    # 200 {"ready": false} never shows ready; the agent is still alive.
    await gateway.wait_for(lambda b: not b["agentReady"], f"/api/servers/{ids[1]}", session)
    # Garbage JSON is recorded as an error, not a crash, and is not ready.
    garbage = await gateway.wait_for(lambda b: not b["agentReady"] and b["agent"]["lastError"],
                                     f"/api/servers/{ids[2]}", session)
    assert "invalid JSON" in garbage["agent"]["lastError"]
    # A hung agent reads as down within two intervals plus its one timeout …
    with trio.fail_after(2 * interval + gateway.settings.agent_timeout + 2):
        await gateway.wait_for(lambda b: not b["agent"]["alive"] and not b["agentReady"],
                               f"/api/servers/{ids[3]}", session)
    # … while the healthy agent keeps being polled on time.
    before = (await _server(gateway, session, ids[0]))["agent"]["lastSeenAt"]
    samples = []
    with trio.move_on_after(3 * interval):
        while True:
            body = await _server(gateway, session, ids[0])
            samples.append(body)
            body1 = await _server(gateway, session, ids[1])
            assert body1["agentReady"] is False
            await trio.sleep(interval / 4)
    assert all(s["agentReady"] for s in samples)
    assert samples[-1]["agent"]["lastSeenAt"] > before
    fleet.set_fault(1, None)
    await gateway.wait_for(lambda b: b["agentReady"], f"/api/servers/{ids[1]}", session)


async def test_killed_agent_is_down_within_two_intervals(gateway: Gateway) -> None:
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "victim")
    kill_agent(gateway, instance["vmid"])
    interval = gateway.settings.poll_interval
    with trio.fail_after(2 * interval + gateway.settings.agent_timeout + 1):
        state = await gateway.wait_for(lambda b: not b["agent"]["alive"], f"/api/servers/{instance['id']}", session)
    assert state["agentReady"] is False
    assert state["agent"]["lastError"].startswith("/health")
