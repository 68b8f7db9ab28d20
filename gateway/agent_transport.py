"""An httpx transport over the data plane's h11 pool, for the agent client.

httpcore's pool looks for a connection by scanning every pooled connection on each request, so with
thousands of agents (a connection each) every poll costs O(fleet) — measured here: 200 agents kept
a core busy. UpstreamPool keys idle connections by (host, port), so a poll costs the same whatever the
fleet size. Only for small, non-streaming calls: the whole answer is read (and capped) here."""

from __future__ import annotations

import httpx
import trio

from .upstream import UpstreamError, UpstreamPool, UpstreamTimeout

MAX_ANSWER_BYTES = 4 * 1024 * 1024


class PooledAgentTransport(httpx.AsyncBaseTransport):
    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        budget = max((t for t in timeouts.values() if t is not None), default=None)
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        target = url.raw_path.decode("ascii")
        headers = [(k.lower(), v) for k, v in request.headers.raw if k.lower() != b"host"]
        body = await request.aread()
        try:
            with trio.fail_after(budget if budget is not None else float("inf")):
                async with self._pool.request(url.host, port, request.method, target, headers, body) as response:
                    content = await response.read_all(MAX_ANSWER_BYTES)
                    status, answer_headers = response.status, response.headers
        except trio.TooSlowError as exc:
            raise httpx.ReadTimeout("agent did not answer in time", request=request) from exc
        except UpstreamTimeout as exc:
            raise httpx.ReadTimeout(str(exc), request=request) from exc
        except UpstreamError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        return httpx.Response(status, headers=answer_headers, content=content, request=request)

    async def aclose(self) -> None:
        await self._pool.aclose()
