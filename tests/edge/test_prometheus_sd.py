"""Prometheus service discovery: the gateway's bearer-protected `http_sd` endpoint, and a real
Prometheus (started by these tests) picking published agents up as targets and dropping them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from control.app import run_gateway
from control.config import Settings
from control.edge import NoEdge, PublishedInstance
from control.edge.configured import edge_publisher
from control.edge.outbox import OutboxPublisher
from storage.db import Store, connect_database
from tests.conftest import Gateway
from tests.edge.servers import PrometheusServer, ensure_installed

TOKEN = "sd-token-" + "t" * 32
SD_PATH = "/api/edge/prometheus-sd"


@pytest.fixture
async def sd_gateway(nursery: trio.Nursery, settings: Settings) -> AsyncIterator[Gateway]:
    settings.prometheus_sd_token = TOKEN
    shutdown = trio.Event()
    binds = await nursery.start(partial(run_gateway, settings, shutdown))
    async with httpx.AsyncClient(base_url=binds[0], timeout=30) as client:
        yield Gateway(binds[0], settings, shutdown, client)
    shutdown.set()


@pytest.fixture
async def publisher(sd_gateway: Gateway) -> AsyncIterator[OutboxPublisher]:
    """A second publisher on the gateway's database, as another replica would have."""
    store = Store(connect_database(sd_gateway.settings.database_url), threads=2)
    chosen, _ = edge_publisher(sd_gateway.settings, store)
    assert isinstance(chosen, OutboxPublisher)
    yield chosen
    store.close()


def agent(instance_id: int, port: int) -> PublishedInstance:
    return PublishedInstance(instance_id=instance_id, vmid=300 + instance_id, kind="game", name="Arena",
                             engine_type="paper", agent_host="127.0.0.1", agent_port=port)


async def test_sd_endpoint_is_bearer_protected_json(sd_gateway: Gateway, publisher: OutboxPublisher) -> None:
    missing = await sd_gateway.client.get(SD_PATH)
    wrong = await sd_gateway.client.get(SD_PATH, headers={"authorization": "Bearer nope"})
    assert missing.status_code == wrong.status_code == 401
    assert wrong.json()["error"] == "UNAUTHORIZED"
    await publisher.publish(agent(1, 18001))
    answer = await sd_gateway.client.get(SD_PATH, headers={"authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == [{"targets": ["127.0.0.1:18001"], "labels": {
        "__metrics_path__": "/metrics", "zlh_instance_id": "1", "zlh_vmid": "301", "zlh_kind": "game",
        "zlh_name": "Arena", "zlh_engine_type": "paper"}}]
    await publisher.unpublish(agent(1, 18001))
    again = await sd_gateway.client.get(SD_PATH, headers={"authorization": f"Bearer {TOKEN}"})
    assert again.json() == []


async def test_sd_endpoint_is_off_and_nothing_is_published_by_default(gateway: Gateway) -> None:
    answer = await gateway.client.get(SD_PATH, headers={"authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 404
    # The gateway's own database: the models' one proxy must not be pointed elsewhere while it runs.
    chosen, worker = edge_publisher(gateway.settings, Store(connect_database(gateway.settings.database_url)))
    assert isinstance(chosen, NoEdge) and worker is None
    assert "no DNS" in chosen.describe()["note"]


async def active_targets(prometheus: PrometheusServer) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=2) as client:
        answer = await client.get(f"{prometheus.url}/api/v1/targets", params={"state": "active"})
    return list(answer.json()["data"]["activeTargets"])


@pytest.mark.e2e  # ~10 s per database: Prometheus applies discovery changes about 5 s late
async def test_prometheus_picks_up_published_agents_and_drops_unpublished_ones(
        sd_gateway: Gateway, publisher: OutboxPublisher) -> None:
    await trio.to_thread.run_sync(ensure_installed)
    await publisher.publish(agent(7, 18007))
    prometheus = PrometheusServer()
    await trio.to_thread.run_sync(prometheus.start, sd_gateway.url + SD_PATH, TOKEN)
    try:
        with trio.fail_after(15):
            while not (found := await active_targets(prometheus)):
                await trio.sleep(0.2)
        [target] = found
        assert target["labels"]["zlh_vmid"] == "307" and target["labels"]["instance"] == "127.0.0.1:18007"
        assert target["discoveredLabels"]["__metrics_path__"] == "/metrics"
        await publisher.unpublish(agent(7, 18007))
        with trio.fail_after(15):
            while await active_targets(prometheus):
                await trio.sleep(0.2)
    finally:
        await trio.to_thread.run_sync(prometheus.stop)
