"""/metrics exposes the process, the build, the poller, streams, consoles, IDE websockets and the
fleet figures, with values that follow what happens; every query of docs/grafana-dashboard.json names
a metric the gateway exports."""

from __future__ import annotations

import json
import os
import re
import signal
from datetime import timedelta
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from storage.clock import utcnow
from storage.edge import EdgeOutbox
from tests.conftest import Gateway
from tests.control.process import sparse_file
from tests.dataplane.helpers import agent_files, container_dir

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
FAMILIES = ["process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds", "python_info",
            "zlh_build_info", "zlh_poller_poll_duration_seconds", "zlh_poller_agents_late",
            "zlh_poller_agents_unreachable", "zlh_edge_outbox_pending", "zlh_edge_outbox_failing",
            "zlh_cluster_slots_held", "zlh_console_connections", "zlh_ide_websockets", "zlh_streams_open"]


async def scrape(gateway: Gateway) -> dict[str, float]:
    """Every sample as `name{labels}` (labels sorted) -> value, plus bare names for unlabelled ones."""
    response = await gateway.client.get("/metrics")
    assert response.status_code == 200
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_metrics_expose_the_listed_families(gateway: Gateway) -> None:
    response = await gateway.client.get("/metrics")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert set(FAMILIES) <= names, set(FAMILIES) - names
    samples = await scrape(gateway)
    assert samples["process_resident_memory_bytes"] > 10 * 1024**2
    assert samples["process_open_fds"] > 0
    assert any(k.startswith("zlh_build_info{") and 'version="' in k for k in samples)


async def test_poller_gauges_follow_an_agent_that_dies(gateway: Gateway) -> None:
    session = await gateway.register()
    server = await gateway.provision(session, "game", "watched")
    samples = await scrape(gateway)
    assert samples["zlh_poller_agents"] == 1
    assert samples["zlh_poller_poll_duration_seconds_count"] > 0
    assert samples["zlh_poller_agents_unreachable"] == 0 and samples["zlh_poller_agents_late"] == 0
    record = json.loads((container_dir(gateway, server["vmid"]) / "container.json").read_text())
    os.kill(record["pid"], signal.SIGKILL)
    with trio.fail_after(20):
        while (await scrape(gateway))["zlh_poller_agents_unreachable"] != 1:
            await trio.sleep(0.2)
        while (await scrape(gateway))["zlh_poller_agents_late"] != 1:  # 1.5 intervals without a poll
            await trio.sleep(0.2)


async def test_outbox_backlog_is_read_from_the_database(gateway: Gateway) -> None:
    def enqueue() -> None:
        now = utcnow()
        EdgeOutbox.create(target="dns", key="instance:999", action="publish", record={}, attempts=2,
                          due_at=now + timedelta(hours=1), last_error="refused")
        EdgeOutbox.create(target="dns", key="instance:998", action="publish", record={},
                          due_at=now + timedelta(hours=1))

    await _run(gateway, enqueue)
    samples = await scrape(gateway)
    assert (samples["zlh_edge_outbox_pending"], samples["zlh_edge_outbox_failing"]) == (2, 1)


async def _run(gateway: Gateway, work) -> None:  # type: ignore[no-untyped-def]
    from control.app import open_store

    store = open_store(gateway.settings)
    try:
        await store.run(work)
    finally:
        store.close()


async def test_download_in_flight_shows_as_an_open_stream(gateway: Gateway) -> None:
    session = await gateway.register()
    server = await gateway.provision(session, "game", "streamer")
    size = 2 * 1024**3  # sparse; far more than socket buffers hold
    await trio.to_thread.run_sync(sparse_file, agent_files(gateway, server["vmid"]) / "big.bin", size)
    url = f"/api/servers/{server['id']}/files/download?path=big.bin"
    async with gateway.client.stream("GET", url, headers=gateway.bearer(session)) as response:
        assert response.status_code == 200, response.headers
        assert int(response.headers["content-length"]) == size
        chunks = response.aiter_raw(65536)  # kept: a collected iterator closes the response
        await chunks.__anext__()  # the first bytes in, the rest held back by a reader that stopped
        assert (await scrape(gateway))['zlh_streams_open{direction="download"}'] == 1
    with trio.fail_after(10):
        while (await scrape(gateway))['zlh_streams_open{direction="download"}'] != 0:
            await trio.sleep(0.1)


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs
    names: set[str] = set()
    for expr in exprs:
        without_labels = re.sub(r"\{[^}]*\}", "", re.sub(r'"[^"]*"', "", expr))
        names |= {n for n in re.findall(r"\b[a-z_][a-z0-9_]*\b", without_labels)
                  if n.startswith(("zlh_", "process_", "python_"))}
    return names


SERIES_SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"],
                   "summary": ["_sum", "_count"]}


async def exported_series(gateway: Gateway) -> set[str]:
    """Every series name the exposition declares, including labelled families with no child yet."""
    text = (await gateway.client.get("/metrics")).text
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in SERIES_SUFFIXES.get(family.type, [""])}
        names |= {sample.name for sample in family.samples}
    return names


async def test_every_dashboard_query_names_an_exported_metric(gateway: Gateway) -> None:
    exported = await exported_series(gateway)
    names = dashboard_metric_names()
    assert names, "the dashboard names no metric"
    assert names <= exported, f"dashboard queries name metrics the gateway does not export: {names - exported}"
