"""Bulk transfer scenarios: a large download and a large upload per column (MB/s and the proxy's
peak RSS), and the gateway's peak RSS across transfer sizes (it must stay flat: streams are streams).

Download sources are sparse files in the agent's data dir and upload sources are sparse files on the
client side, so no disk is read; each uploaded file is deleted at once so its dirty pages never reach
the disk during a later measurement. It must never report a transfer that ended short or non-2xx.
"""

from __future__ import annotations

import time

from bench.harness import Suite
from bench.loadgen import curl_download, curl_upload, sparse_file
from bench.results import Metric, ScenarioResult, Target
from bench.scenarios.common import (
    MB,
    Endpoint,
    agent_endpoints,
    cores_watched,
    gateway_route_skip,
    human_size,
    median,
    proxy_pids,
)
from bench.system import cpu_seconds, free_disk_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes

THROUGHPUT = Metric("mb_per_s", "throughput", "MB/s", True)
PEAK_RSS = Metric("peak_rss_mb", "proxy peak RSS", "MB", False)
CPU_PER_GB = Metric("cpu_s_per_gb", "proxy CPU per GB", "s", False)
SECONDS_PER_GB = 30.0  # a transfer slower than ~33 MB/s is a failure, not a figure


def _download_url(suite: Suite, endpoint: Endpoint, name: str) -> str:
    if endpoint.column == "gateway":
        return f"{endpoint.base}/api/servers/{suite.game_server_id}/files/download?path={name}"
    return f"{endpoint.base}/files/download?path={name}"


def _upload_url(suite: Suite, endpoint: Endpoint, name: str) -> str:
    if endpoint.column == "gateway":
        return f"{endpoint.base}/api/servers/{suite.game_server_id}/files/upload?path={name}"
    return f"{endpoint.base}/files/upload?path={name}"


def _timeout(size: int) -> float:
    return 30 + SECONDS_PER_GB * size / 1e9


def _repeats(suite: Suite) -> int:
    return 1 if suite.config.quick else 3


async def large_download(suite: Suite) -> ScenarioResult:
    size = suite.config.transfer_bytes
    result = ScenarioResult("download", f"download {human_size(size)}", [THROUGHPUT, PEAK_RSS, CPU_PER_GB],
                            [Target("mb_per_s", "≥ 1.0x nginx", "nginx", 1.0, True),
                             Target("mb_per_s", "≥ 0.8x direct (issue 20)", "direct", 0.8, True)])
    name = f"bench-download-{size}.bin"
    sparse_file(suite.agent.files_dir / name, size)
    await _transfer_columns(suite, result, size, download=True, name=name)
    result.notes.append(f"median of {_repeats(suite)} curl downloads to /dev/null per column; "
                        "MB = 10^6 bytes; the source is a sparse file (no disk reads)")
    return result


async def large_upload(suite: Suite) -> ScenarioResult:
    size = suite.config.transfer_bytes
    result = ScenarioResult("upload", f"upload {human_size(size)}", [THROUGHPUT, PEAK_RSS, CPU_PER_GB],
                            [Target("mb_per_s", "≥ 1.0x nginx (issue 20)", "nginx", 1.0, True)])
    await _transfer_columns(suite, result, size, download=False, name="bench-upload.bin")
    result.notes.append(f"median of {_repeats(suite)} curl PUTs of a sparse file per column; the agent "
                        "writes each upload to its page cache and the bench deletes it at once")
    return result


async def _transfer_columns(suite: Suite, result: ScenarioResult, size: int, *, download: bool,
                            name: str) -> None:
    source = sparse_file(suite.workdir / f"upload-source-{size}.bin", size) if not download else None
    endpoints = agent_endpoints(suite, result)
    live: list[Endpoint] = []
    for endpoint in endpoints:
        if endpoint.column == "gateway":
            url = (_download_url if download else _upload_url)(suite, endpoint, name)
            skip = await gateway_route_skip(suite, "GET" if download else "PUT", url, endpoint.headers)
            if skip:
                result.skip("gateway", skip)
                suite.progress(f"  gateway: {skip}")
                continue
        live.append(endpoint)
    speeds: dict[str, list[float]] = {e.column: [] for e in live}
    peaks: dict[str, list[float]] = {e.column: [] for e in live}
    cpu: dict[str, list[float]] = {e.column: [] for e in live}
    for _ in range(_repeats(suite)):
        # Columns alternate within each repeat so slow drift on a shared machine hits them alike.
        for endpoint in live:
            pids = proxy_pids(suite, endpoint.column)
            reset_peak_rss(pids)
            cpu_before = cpu_seconds(pids)
            async with cores_watched(result):
                if download:
                    transfer = await curl_download(
                        _download_url(suite, endpoint, name), headers=endpoint.headers,
                        expected_size=size, cores=suite.cores.load, timeout=_timeout(size))
                else:
                    assert source is not None
                    transfer = await curl_upload(
                        _upload_url(suite, endpoint, name), source, headers=endpoint.headers,
                        cores=suite.cores.load, timeout=_timeout(size))
                    (suite.agent.files_dir / name).unlink(missing_ok=True)
            speeds[endpoint.column].append(transfer.megabytes_per_second)
            cpu[endpoint.column].append((cpu_seconds(pids) - cpu_before) / (size / 1e9))
            peak = peak_rss_bytes(pids)
            if peak is not None and endpoint.column != "direct":
                peaks[endpoint.column].append(peak / MB)
            suite.progress(f"  {endpoint.column}: {transfer.megabytes_per_second:,.0f} MB/s")
    for column, values in speeds.items():
        result.record(column, THROUGHPUT.key, median(values))
        if peaks[column]:
            result.record(column, PEAK_RSS.key, max(peaks[column]))
        result.record(column, CPU_PER_GB.key, median(cpu[column]))
    if source is not None:
        source.unlink(missing_ok=True)


async def flat_memory(suite: Suite) -> ScenarioResult:
    sizes = suite.config.flat_rss_sizes
    metrics = [Metric("idle_rss_mb", "gateway RSS before", "MB", False)]
    for size in sizes:
        metrics.append(Metric(f"down_{size}", f"peak RSS, {human_size(size)} down", "MB", False))
        metrics.append(Metric(f"up_{size}", f"peak RSS, {human_size(size)} up", "MB", False))
    metrics.append(Metric("spread_mb", "spread of peaks (max-min)", "MB", False))
    result = ScenarioResult("flat_rss", f"gateway RSS across {human_size(sizes[0])}–{human_size(sizes[-1])}",
                            metrics, [Target("spread_mb", "≤ 16 MB", None, 16.0, False)])
    reason = "gateway-only scenario (the gateway's own memory across sizes)"
    result.skip("direct", reason)
    result.skip("nginx", reason)
    gateway = Endpoint("gateway", suite.gateway.url, suite.session.headers)
    sparse_file(suite.agent.files_dir / "bench-probe.bin", 1)
    probe = await gateway_route_skip(suite, "GET", _download_url(suite, gateway, "bench-probe.bin"),
                                     gateway.headers)
    if probe:
        result.skip("gateway", probe)
        return result
    if free_disk_bytes(suite.agent.data_dir) < 2 * sizes[-1]:
        result.notes.append(f"uploads of {human_size(sizes[-1])} skipped: not enough free disk")
    pids = suite.gateway.pids()
    peaks: list[float] = []
    result.record("gateway", "idle_rss_mb", (rss_bytes(pids) or 0) / MB)
    for size in sizes:
        name = f"bench-flat-{size}.bin"
        sparse_file(suite.agent.files_dir / name, size)
        reset_peak_rss(pids)
        started = time.monotonic()
        async with cores_watched(result):
            await curl_download(_download_url(suite, gateway, name), headers=gateway.headers,
                                expected_size=size, cores=suite.cores.load, timeout=_timeout(size))
        (suite.agent.files_dir / name).unlink(missing_ok=True)
        peak = (peak_rss_bytes(pids) or 0) / MB
        peaks.append(peak)
        result.record("gateway", f"down_{size}", peak)
        suite.progress(f"  {human_size(size)} down: peak {peak:.1f} MB ({time.monotonic() - started:.1f}s)")
        if free_disk_bytes(suite.agent.data_dir) < 2 * size:
            continue
        source = sparse_file(suite.workdir / f"flat-source-{size}.bin", size)
        reset_peak_rss(pids)
        async with cores_watched(result):
            await curl_upload(_upload_url(suite, gateway, name), source, headers=gateway.headers,
                              cores=suite.cores.load, timeout=_timeout(size))
        (suite.agent.files_dir / name).unlink(missing_ok=True)
        source.unlink(missing_ok=True)
        peak = (peak_rss_bytes(pids) or 0) / MB
        peaks.append(peak)
        result.record("gateway", f"up_{size}", peak)
        suite.progress(f"  {human_size(size)} up: peak {peak:.1f} MB")
    result.record("gateway", "spread_mb", max(peaks) - min(peaks))
    result.notes.append("peak RSS (VmHWM) of the gateway process, reset before each transfer")
    return result
