"""Small-request scenarios driven by wrk: many small GETs through the IDE proxy path (against nginx
doing the same, default and with upstream keep-alive, and the upstream directly), and control API
reads, which exist only in the gateway: `GET /api/servers` with N servers and `GET /api/servers/:id`
for the bench user, and an admin's page of a 10,000-server listing.

The IDE upstream is a small-answer nginx on the load cores when nginx is installed (the agent's Python
IDE stand-in caps every column near 5k req/s, which hides the proxies' own cost); the notes say which.
It must never report a run in which more than 1% of answers were errors (loadgen raises instead).
"""

from __future__ import annotations

from bench.harness import (
    AgentRow,
    Suite,
    admin_session,
    insert_instances,
    insert_listing_rows,
    nginx_upstreams,
)
from bench.loadgen import WrkResult, run_wrk
from bench.nginx import RunningNginx, running_nginx
from bench.processes import BenchError
from bench.results import Metric, ScenarioResult, Target
from bench.scenarios.common import cores_watched, proxy_pids
from bench.scenarios.websockets import GatewaySkip, ide_cookie
from bench.system import cpu_seconds, process_tree

RPS = Metric("rps", "requests", "req/s", True)
P50 = Metric("p50_ms", "latency p50", "ms", False)
P99 = Metric("p99_ms", "latency p99", "ms", False)
CPU = Metric("cpu_us_per_req", "proxy CPU per request", "µs", False)
ONE_RPS = Metric("one_rps", "GET /api/servers/:id", "req/s", True)
ONE_P99 = Metric("one_p99_ms", "GET /api/servers/:id p99", "ms", False)
ONE_CPU = Metric("one_cpu_us_per_req", "GET /api/servers/:id CPU per request", "µs", False)
NODE_HTTP_PROXY_RPS = 5000.0  # NOTES.md: Node http-proxy, no upstream keep-alive, this machine
ADMIN_LISTING_SERVERS = 10_000
ADMIN_PAGE_SIZE = 100


async def _measure(suite: Suite, result: ScenarioResult, column: str, url: str,
                   headers: dict[str, str], *, pids: list[int] | None = None,
                   keys: tuple[str, str, str, str] = (RPS.key, P50.key, P99.key, CPU.key)) -> WrkResult:
    pids = proxy_pids(suite, column) if pids is None else pids
    cpu_before = cpu_seconds(pids)
    async with cores_watched(result):
        run = await run_wrk(url, headers=headers, connections=suite.config.wrk_connections,
                            seconds=suite.config.wrk_seconds, workdir=suite.workdir, cores=suite.cores.load)
    rps, p50, p99, cpu = keys
    result.record(column, rps, run.requests_per_second)
    if p50:
        result.record(column, p50, run.p50_us / 1000)
    result.record(column, p99, run.p99_us / 1000)
    if run.requests:
        result.record(column, cpu, (cpu_seconds(pids) - cpu_before) / run.requests * 1e6)
    suite.progress(f"  {column}: {run.requests_per_second:,.0f} req/s, p50 {run.p50_us / 1000:.2f} ms, "
                   f"p99 {run.p99_us / 1000:.2f} ms")
    return run


def _ide_targets(suite: Suite) -> tuple[str, str, str, str]:
    """(direct URL, gateway path prefix, nginx path prefix, what the upstream is) for the small GETs."""
    if suite.fast_ide is not None:
        return (f"{suite.fast_ide.upstream.url}/bench-small", f"/__ide/{suite.fast_ide.server_id}",
                "/__ide_fast", "the small-answer nginx on the load cores (a fixed small JSON)")
    ide_base = suite.agent.url.rsplit(":", 1)[0] + f":{suite.agent.ide_port}"
    return (f"{ide_base}/bench-small", f"/__ide/{suite.dev_server_id}", "/__ide",
            "the agent's Python IDE stand-in (nginx is not installed), which caps every column near 5k req/s")


async def ide_small_gets(suite: Suite) -> ScenarioResult:
    result = ScenarioResult("ide_gets", "small GETs through the IDE path", [RPS, P50, P99, CPU], [
        Target("rps", "≥ 5,000 req/s (Node http-proxy, NOTES)", None, NODE_HTTP_PROXY_RPS, True),
        Target("cpu_us_per_req", "≤ 150 µs (issue 20)", None, 150.0, False)])
    direct, gateway_prefix, nginx_prefix, upstream = _ide_targets(suite)
    await _measure(suite, result, "direct", direct, {})
    try:
        cookie = await ide_cookie(suite, suite.fast_ide.server_id if suite.fast_ide is not None else None)
        await _measure(suite, result, "gateway", f"{suite.gateway.url}{gateway_prefix}/bench-small", cookie)
    except GatewaySkip as skip:
        result.skip("gateway", str(skip))
        suite.progress(f"  gateway: {skip}")
    if suite.nginx is not None:
        await _measure(suite, result, "nginx", f"{suite.nginx.url}{nginx_prefix}/bench-small", {})
    else:
        result.skip("nginx", suite.nginx_skip or "nginx is not running")
    result.notes.append(f"wrk, {suite.config.wrk_connections} keep-alive connections, "
                        f"{suite.config.wrk_seconds:.0f} s per column; upstream: {upstream}; nginx upstream "
                        "keep-alive: " + ("on" if suite.config.nginx_keepalive else "off (nginx default)")
                        + " (ide_gets_keepalive has the other)")
    return result


async def ide_small_gets_keepalive(suite: Suite) -> ScenarioResult:
    """The same small GETs with nginx as a tuned deployer runs it (upstream keep-alive on, or off when
    --nginx-keepalive already gave the default nginx keep-alive): gateway and nginx side by side."""
    keepalive = not suite.config.nginx_keepalive
    label = "on" if keepalive else "off"
    result = ScenarioResult("ide_gets_keepalive", f"small GETs, nginx upstream keep-alive {label}",
                            [RPS, P50, P99, CPU])
    result.skip("direct", "measured in ide_gets")
    _direct, gateway_prefix, nginx_prefix, upstream = _ide_targets(suite)
    try:
        cookie = await ide_cookie(suite, suite.fast_ide.server_id if suite.fast_ide is not None else None)
        await _measure(suite, result, "gateway", f"{suite.gateway.url}{gateway_prefix}/bench-small", cookie)
    except GatewaySkip as skip:
        result.skip("gateway", str(skip))
    if suite.nginx is None:
        result.skip("nginx", suite.nginx_skip or "nginx is not running")
        return result
    upstreams = nginx_upstreams(suite.agent, keepalive, suite.fast_ide)
    async with running_nginx(suite.workdir / f"keepalive-{label}", upstreams, cores=suite.cores.proxy,
                             log_dir=suite.workdir) as tuned:
        await _measure(suite, result, "nginx", f"{tuned.url}{nginx_prefix}/bench-small", {},
                       pids=_nginx_pids(tuned))
    result.notes.append(f"nginx here: a second nginx with upstream keep-alive {label} (keepalive 64), same core; "
                        f"upstream: {upstream}")
    return result


def _nginx_pids(nginx: RunningNginx) -> list[int]:
    return process_tree(nginx.child.pid)


async def control_api_reads(suite: Suite) -> ScenarioResult:
    wanted = suite.config.api_servers
    result = ScenarioResult("api_reads", f"GET /api/servers at {wanted} servers",
                            [RPS, P50, P99, CPU, ONE_RPS, ONE_P99, ONE_CPU], [
                                Target("rps", "≥ 2,000 req/s (issue 20)", None, 2000.0, True),
                                Target("p99_ms", "≤ 50 ms at 50 connections", None, 50.0, False),
                                Target("one_rps", "≥ 4,000 req/s (issue 20)", None, 4000.0, True)])
    reason = "the control API exists only in the gateway"
    result.skip("direct", reason)
    result.skip("nginx", reason)
    session = await suite.fresh_session()
    listed = await suite.http.get(f"{suite.gateway.url}/api/servers", headers=session.headers)
    have = len(listed.json()) if listed.status_code == 200 else 0
    if wanted > have:
        agent = suite.agent
        await suite.gateway.storage(insert_instances, session.user_id,
                                    [AgentRow("game", agent.port, agent.secret)] * (wanted - have), "api")
    await _measure(suite, result, "gateway", f"{suite.gateway.url}/api/servers", session.headers)
    await _measure(suite, result, "gateway", f"{suite.gateway.url}/api/servers/{suite.game_server_id}",
                   session.headers, keys=(ONE_RPS.key, "", ONE_P99.key, ONE_CPU.key))
    result.notes.append("every server row points at the bench's one reference agent, polled every "
                        f"{suite.config.poll_interval:.0f} s; reads never reach an agent")
    return result


async def admin_listing_page(suite: Suite) -> ScenarioResult:
    """An admin's page of the whole fleet's listing at 10,000 servers: keyset pagination from the middle."""
    total = suite.config.admin_servers
    result = ScenarioResult("admin_page", f"admin: one page of {ADMIN_PAGE_SIZE} at {total:,} servers",
                            [RPS, P50, P99, CPU])
    reason = "the control API exists only in the gateway"
    result.skip("direct", reason)
    result.skip("nginx", reason)
    admin = await admin_session(suite.http, suite.gateway)
    counted = await suite.http.get(f"{suite.gateway.url}/api/servers", headers=admin.headers)
    have = len(counted.json()) if counted.status_code == 200 else 0
    if total > have:
        await suite.gateway.storage(insert_listing_rows, admin.user_id, total - have)
    middle = await suite.http.get(f"{suite.gateway.url}/api/servers?pageSize={ADMIN_PAGE_SIZE}&after={total // 2}",
                                  headers=admin.headers)
    if middle.status_code != 200 or len(middle.json().get("items", [])) != ADMIN_PAGE_SIZE:
        raise BenchError(f"admin page answered {middle.status_code}: {middle.text[:200]}")
    await _measure(suite, result, "gateway",
                   f"{suite.gateway.url}/api/servers?pageSize={ADMIN_PAGE_SIZE}&after={total // 2}", admin.headers)
    result.notes.append(f"{total:,} servers in all (the extra rows have no agent, so the poller skips them); "
                        f"the page after id {total // 2}, {ADMIN_PAGE_SIZE} servers")
    return result

