"""A gateway restart: running agents are re-adopted (no orphans, no duplicates) and a provisioning
interrupted half-way resumes."""

from __future__ import annotations

import json
from functools import partial

import httpx
import trio

from control.app import run_gateway
from control.config import Settings
from tests.conftest import Gateway
from tests.dataplane.helpers import container_dir


async def _serve(nursery: trio.Nursery, settings: Settings) -> tuple[trio.Event, httpx.AsyncClient, str]:
    shutdown = trio.Event()
    binds = await nursery.start(partial(run_gateway, settings, shutdown))
    return shutdown, httpx.AsyncClient(base_url=binds[0], timeout=30), binds[0]


async def test_restart_readopts_agents_and_resumes_provisioning(settings: Settings) -> None:
    settings.local_stop_agents_on_exit = False
    carry: dict = {}
    async with trio.open_nursery() as outer:

        async def first_life() -> None:
            async with trio.open_nursery() as nursery:
                shutdown, client, url = await _serve(nursery, settings)
                gateway = Gateway(url, settings, shutdown, client)
                session = await gateway.register()
                ready = await gateway.provision(session, "game", "keeper")
                # Start a second provisioning and stop the gateway before it can finish.
                pending = await client.post("/api/instances", headers=gateway.bearer(session),
                                            json={"kind": "dev", "name": "half", "engineType": "vscode"})
                assert pending.status_code == 202
                shutdown.set()
                await client.aclose()
                carry.update(ready=ready, pending=pending.json())

        outer.start_soon(first_life)
    ready, pending = carry["ready"], carry["pending"]
    record = json.loads((settings.data_dir / "containers" / str(ready["vmid"]) / "container.json").read_text())
    settings.local_stop_agents_on_exit = True
    async with trio.open_nursery() as nursery:
        shutdown, client, url = await _serve(nursery, settings)
        gateway = Gateway(url, settings, shutdown, client)
        login = await client.post("/api/auth/login", json={"email": "user@example.com", "password": "password123"})
        session = login.json()
        state = await gateway.wait_for(lambda b: b["agentReady"], f"/api/servers/{ready['id']}", session)
        assert state["instanceState"] == "ready"
        again = json.loads((container_dir(gateway, ready["vmid"]) / "container.json").read_text())
        assert again["pid"] == record["pid"]  # re-adopted, not restarted
        await gateway.wait_for(lambda b: b["instanceState"] == "ready" and b["agentReady"],
                               f"/api/servers/{pending['id']}", session)
        listed = (await client.get("/api/instances", headers=gateway.bearer(session))).json()
        assert sorted(i["vmid"] for i in listed) == sorted([ready["vmid"], pending["vmid"]])
        shutdown.set()
        await client.aclose()
