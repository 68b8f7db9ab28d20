"""Operations in progress across replicas, on real processes: a dev environment being created (its dev
container provisioning, its IDE to start) is driven by one replica only — a second replica starting
leaves it alone — and when that replica is killed with SIGKILL another takes it over within the
takeover bound and finishes it, once. The agent is scripted in this process and records which replica
asks it what (by socket, see helpers.RequestOrigins)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bench.agent.http import (
    Request,
    Response,
    bound_port,
    error_response,
    json_response,
    open_listeners,
    serve_listeners,
)
from bench.agent.simulator import SimulatedAgent, serve_simulated
from storage import environments as store_env
from storage import instances as store_instances
from tests.cluster.helpers import (
    TAKEOVER_BOUND,
    Cluster,
    RequestOrigins,
    cluster,
    register,
    storage,
    wait_until,
)
from tests.conftest import DATABASES

# Real replica processes killed and restarted: run by `make e2e` (CI runs it after `make test`).
pytestmark = [pytest.mark.skipif("postgresql" not in DATABASES, reason="scale-out runs on PostgreSQL only"),
              pytest.mark.e2e]

ENVIRONMENT = "env-takeover"


@dataclass
class Call:
    at: float  # trio time
    path: str
    replica: str


class ScriptedAgent:
    """A dev container's agent that answers /health 503 until `healthy()`: a provisioning stays in its
    configuring step, asking /health every ready poll (the poller never asks a configuring agent)."""

    def __init__(self, replicas: Cluster) -> None:
        self.secret = secrets.token_urlsafe(16)
        self.simulated = SimulatedAgent(0, self.secret, "running", [], 0.0)
        self.origins = RequestOrigins(replicas)
        self.healthy_at: float | None = None
        self.calls: list[Call] = []
        self.port = 0

    def healthy(self) -> None:
        self.healthy_at = trio.current_time()

    def asked(self, path: str, since: float, until: float | None = None) -> list[str]:
        """The replicas that asked `path` in [since, until), in order."""
        return [c.replica for c in self.calls
                if c.path == path and c.at >= since and (until is None or c.at < until)]

    async def handle(self, request: Request) -> Response:
        self.calls.append(Call(trio.current_time(), request.path, self.origins.of(request, self.port)))
        if request.path == "/health" and self.healthy_at is None:
            return error_response(503, "STARTING")
        if request.path == "/dev/codeserver/start":
            return json_response({"running": True})
        return await serve_simulated(self.simulated, request, request.path)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await open_listeners("127.0.0.1", 0)
        self.port = bound_port(listeners)
        await serve_listeners(self.handle, listeners, task_status=task_status)


def environment_being_created(owner_id: int, agent_port: int, agent_secret: str, driver: str) -> int:
    """A dev environment in CREATING whose dev container is configuring, both driven by `driver`."""
    instance = store_instances.create_instance(
        vmid=store_instances.next_free_vmid(), owner=owner_id, kind="dev", name="workspace", engine_type="vscode",
        payload={}, allocated_ports=[], provider="local", agent_host="127.0.0.1", agent_port=agent_port,
        agent_secret=agent_secret, state="configuring", driven_by=driver)
    store_env.create_environment(
        id=ENVIRONMENT, owner=owner_id, instance_id=instance.id, name="workspace", cloud_provider="GCP",
        cloud_region="europe-west1", cpu_cores=1, memory_gb=1, storage_gb=10, base_image="node", status="CREATING",
        driven_by=driver)
    return int(instance.id)


def progress(instance_id: int) -> dict[str, Any]:
    instance = store_instances.get_instance(instance_id)
    environment = store_env.get_environment(ENVIRONMENT)
    assert instance is not None and environment is not None
    return {"instance": (instance.state, instance.driven_by), "environment": (environment.status,
                                                                              environment.driven_by)}


async def test_an_operation_is_driven_by_one_replica_and_finished_by_another_when_it_dies(
        pg_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = pg_cluster.fresh_database()
    async with cluster(url, tmp_path) as replicas, httpx.AsyncClient(timeout=10) as http, \
            trio.open_nursery() as nursery:
        agent = ScriptedAgent(replicas)
        await nursery.start(agent.run)
        [first] = await replicas.start("r1")
        session = await register(http, first.url, "dev@example.com")
        # Left behind by a replica that died before the test: r1's sweep takes both operations over.
        instance_id = await storage(url, environment_being_created, session["user"]["id"], agent.port, agent.secret,
                                    "r0")
        await wait_until(lambda: "r1" in agent.asked("/health", 0), TAKEOVER_BOUND)

        await replicas.start("r2")
        joined = trio.current_time()
        await trio.sleep(TAKEOVER_BOUND)  # a start-up claim and many sweeps of r2
        assert set(agent.asked("/health", joined)) == {"r1"}
        assert await storage(url, progress, instance_id) == {"instance": ("configuring", "r1"),
                                                             "environment": ("CREATING", "r1")}

        first.kill()
        killed = trio.current_time()
        took = await wait_until(lambda: "r2" in agent.asked("/health", killed), 2 * TAKEOVER_BOUND)
        print(f"\nr2 took the provisioning over {took:.2f}s after r1 was killed")
        assert took < TAKEOVER_BOUND

        agent.healthy()

        async def finished() -> bool:
            return await storage(url, progress, instance_id) == {"instance": ("ready", "r2"),
                                                                 "environment": ("RUNNING", "r2")}

        await wait_until(finished, 15)
        assert agent.asked("/dev/codeserver/start", 0) == ["r2"]  # the IDE started once, by the new driver
        assert set(agent.asked("/health", killed + 0.5, agent.healthy_at)) == {"r2"}
        nursery.cancel_scope.cancel()
