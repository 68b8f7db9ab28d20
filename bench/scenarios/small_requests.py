"""Small-request scenarios driven by wrk: many small GETs through the IDE proxy path (against nginx
doing the same, and the agent's IDE stand-in directly), and control API reads (`GET /api/servers`
with N servers), which exist only in the gateway.

It must never report a run in which more than 1% of answers were errors (loadgen raises instead).
"""

from __future__ import annotations

from bench.harness import AgentRow, Suite, insert_instances
from bench.loadgen import WrkResult, run_wrk
from bench.results import Metric, ScenarioResult, Target
from bench.scenarios.common import cores_watched, proxy_pids
from bench.scenarios.websockets import GatewaySkip, ide_cookie
from bench.system import cpu_seconds

RPS = Metric("rps", "requests", "req/s", True)
P50 = Metric("p50_ms", "latency p50", "ms", False)
P99 = Metric("p99_ms", "latency p99", "ms", False)
CPU = Metric("cpu_us_per_req", "proxy CPU per request", "µs", False)
NODE_HTTP_PROXY_RPS = 5000.0  # NOTES.md: Node http-proxy, no upstream keep-alive, this machine


async def _measure(suite: Suite, result: ScenarioResult, column: str, url: str,
                   headers: dict[str, str]) -> WrkResult:
    pids = proxy_pids(suite, column)
    cpu_before = cpu_seconds(pids)
    async with cores_watched(result):
        run = await run_wrk(url, headers=headers, connections=suite.config.wrk_connections,
                            seconds=suite.config.wrk_seconds, workdir=suite.workdir, cores=suite.cores.load)
    result.record(column, RPS.key, run.requests_per_second)
    result.record(column, P50.key, run.p50_us / 1000)
    result.record(column, P99.key, run.p99_us / 1000)
    if run.requests:
        result.record(column, CPU.key, (cpu_seconds(pids) - cpu_before) / run.requests * 1e6)
    suite.progress(f"  {column}: {run.requests_per_second:,.0f} req/s, p50 {run.p50_us / 1000:.2f} ms, "
                   f"p99 {run.p99_us / 1000:.2f} ms")
    return run


async def ide_small_gets(suite: Suite) -> ScenarioResult:
    result = ScenarioResult("ide_gets", "small GETs through the IDE path", [RPS, P50, P99, CPU], [
        Target("rps", "≥ 5,000 req/s (Node http-proxy, NOTES)", None, NODE_HTTP_PROXY_RPS, True)])
    ide_base = suite.agent.url.rsplit(":", 1)[0] + f":{suite.agent.ide_port}"
    await _measure(suite, result, "direct", f"{ide_base}/bench-small", {})
    try:
        cookie = await ide_cookie(suite)
        await _measure(suite, result, "gateway",
                       f"{suite.gateway.url}/__ide/{suite.dev_server_id}/bench-small", cookie)
    except GatewaySkip as skip:
        result.skip("gateway", str(skip))
        suite.progress(f"  gateway: {skip}")
    if suite.nginx is not None:
        await _measure(suite, result, "nginx", f"{suite.nginx.url}/__ide/bench-small", {})
    else:
        result.skip("nginx", suite.nginx_skip or "nginx is not running")
    result.notes.append(f"wrk, {suite.config.wrk_connections} keep-alive connections, "
                        f"{suite.config.wrk_seconds:.0f} s per column; the agent's IDE stand-in answers a "
                        "small JSON echo; nginx upstream keep-alive: "
                        + ("on" if suite.config.nginx_keepalive else "off (nginx default)"))
    return result


async def control_api_reads(suite: Suite) -> ScenarioResult:
    wanted = suite.config.api_servers
    result = ScenarioResult("api_reads", f"GET /api/servers at {wanted} servers", [RPS, P50, P99, CPU])
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
    result.notes.append("every server row points at the bench's one reference agent, polled every "
                        f"{suite.config.poll_interval:.0f} s; reads never reach an agent")
    return result
