"""Body forwarding for the data plane: a client request relayed to an upstream (an agent or a dev
container) and its response relayed back, chunk by chunk with backpressure both ways.

Rules this module keeps: never hold a body whole; count bytes as they flow and stop at the limit;
a client that aborts aborts the upstream request (its connection is dropped mid-body, so the agent
discards the partial upload); an upstream that dies mid-response aborts the client connection instead
of ending a short body as if it were complete; hop-by-hop headers never cross; the gateway's own
credentials (Authorization, cookies) never reach an upstream unless the caller puts its own in.

Zero-copy: a body of at least SPLICE_MIN_BYTES with a Content-Length, passed through untouched, goes
socket to socket with splice (gateway/fdio.py Splice; measured in the bench as CPU per GB) — a download
on the client connection, an upload on the agent connection. Chunked bodies, small ones and anything
relayed without a length take the copy path. The same limits hold on both: an upload's declared length
is checked against the plan before a byte moves, and exactly that many bytes are moved. A spliced
download closes its agent connection afterwards and a spliced upload its client connection (h11 did not
see those bytes, so neither can be reused); both abort as the copy path does when a side goes away."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from .errors import ApiError
from .fdio import Splice
from .metrics import Metrics
from .server import ClientGone, Exchange
from .upstream import (
    Headers,
    UpstreamBroken,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-connection",
})
GATEWAY_CREDENTIALS = frozenset({b"authorization", b"cookie"})
STALL_TIMEOUT = 60.0
SPLICE_MIN_BYTES = 1 << 20  # below this a pipe and two syscalls per turn save nothing over one copy
NO_BODY_STATUSES = frozenset({204, 304})


def request_headers(headers: Iterable[tuple[bytes, bytes]], *, keep: frozenset[bytes] | None = None,
                    drop: frozenset[bytes] = frozenset()) -> Headers:
    """Headers fit to forward upstream: no hop-by-hop, no gateway credentials, no Host (the pool
    sets the upstream's own), plus only `keep` when given."""
    connection_tokens = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
    out: Headers = []
    for key, value in headers:
        if key in HOP_BY_HOP or key in connection_tokens or key in GATEWAY_CREDENTIALS or key == b"host":
            continue
        if key in drop or (keep is not None and key not in keep):
            continue
        out.append((key, value))
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]], *, drop: frozenset[bytes] = frozenset()) -> Headers:
    connection_tokens = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
    return [(k, v) for k, v in headers
            if k not in HOP_BY_HOP and k not in connection_tokens and k not in drop]


async def counted(body: AsyncIterator[bytes | Splice], limit: int | None, metrics: Metrics | None = None,
                  direction: str = "upload") -> AsyncIterator[bytes | Splice]:
    """Pass a body through, stopping with 413 the moment it exceeds `limit` bytes."""
    total = 0
    async for chunk in body:
        total += len(chunk)
        if limit is not None and total > limit:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", {"limit": limit})
        if metrics is not None:
            metrics.bytes_streamed.labels(direction).inc(len(chunk))
            if isinstance(chunk, Splice):
                metrics.bytes_spliced.labels(direction).inc(len(chunk))
        yield chunk


def _client_failed(reason: str, stalled: bool) -> Exception:
    return ClientGone(reason)


def _upstream_failed(reason: str, stalled: bool) -> Exception:
    return UpstreamTimeout(reason) if stalled else UpstreamBroken(reason)


async def spliced_request_body(exchange: Exchange, length: int) -> AsyncIterator[bytes | Splice]:
    """The request body for a zero-copy upload: the bytes h11 already read past the head, then a Splice
    of the rest straight from the client socket. The client connection is closed after this exchange."""
    client, prefix = exchange.take_over()
    prefix = prefix[:length]
    if prefix:
        yield prefix
    if length > len(prefix):
        yield Splice(client, length - len(prefix), STALL_TIMEOUT, _client_failed)


def spliceable_length(method: str, response: UpstreamResponse) -> int | None:
    """The Content-Length of a response body the relay may splice, else None (copy path)."""
    if method == "HEAD" or response.status in NO_BODY_STATUSES or response.status < 200:
        return None
    if response.header(b"transfer-encoding") is not None:
        return None
    value = response.header(b"content-length")
    if value is None or not value.isdigit():
        return None
    length = int(value)
    return length if length >= SPLICE_MIN_BYTES else None


async def _send_spliced_body(exchange: Exchange, response: UpstreamResponse, length: int,
                             metrics: Metrics | None) -> None:
    upstream, prefix = response.detach_body()
    prefix = prefix[:length]
    await exchange.send_data(prefix)
    if length > len(prefix):
        await exchange.send_data(Splice(upstream, length - len(prefix), STALL_TIMEOUT, _upstream_failed))
    if metrics is not None:
        metrics.bytes_streamed.labels("download").inc(length)
        metrics.bytes_spliced.labels("download").inc(length - len(prefix))


def declared_length(exchange: Exchange) -> int | None:
    value = exchange.request.header(b"content-length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise ApiError(400, "BAD_REQUEST", {"reason": "invalid Content-Length"}) from None
    if length < 0:
        raise ApiError(400, "BAD_REQUEST", {"reason": "invalid Content-Length"})
    return length


async def relay(
    exchange: Exchange,
    pool: UpstreamPool,
    host: str,
    port: int,
    method: str,
    target: str,
    headers: Headers,
    *,
    upload_limit: int | None = None,
    send_body: bool = False,
    metrics: Metrics | None = None,
    response_drop: frozenset[bytes] = frozenset(),
) -> int:
    """Forward one exchange upstream and the answer back. Returns the upstream status."""
    body = None
    spliced_upload = False
    if send_body:
        length = declared_length(exchange)
        if upload_limit is not None and length is not None and length > upload_limit:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", {"limit": upload_limit, "declared": length})
        spliced_upload = length is not None and length >= SPLICE_MIN_BYTES
        source = spliced_request_body(exchange, length) if spliced_upload and length else exchange.body()
        body = counted(source, upload_limit, metrics, "upload")
        if length is None:
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        elif not any(k == b"content-length" for k, _ in headers):
            headers = [*headers, (b"content-length", str(length).encode())]
    try:
        async with pool.request(host, port, method, target, headers, body) as response:
            answer = response_headers(response.headers, drop=response_drop)
            if spliced_upload:  # the client connection cannot be reused (see the module docstring)
                answer.append((b"connection", b"close"))
            await exchange.send_head(response.status, answer)
            answer_length = spliceable_length(method, response)
            if answer_length is not None:
                await _send_spliced_body(exchange, response, answer_length, metrics)
                await exchange.end()
                return response.status
            async for chunk in response.body(idle_timeout=STALL_TIMEOUT):
                await exchange.send_data(chunk)
                if metrics is not None:
                    metrics.bytes_streamed.labels("download").inc(len(chunk))
            await exchange.end()
            return response.status
    except UpstreamTimeout as exc:
        if exchange.headers_sent:
            raise
        raise ApiError(504, "AGENT_TIMEOUT", {"reason": str(exc)}) from exc
    except (UpstreamBroken, UpstreamError) as exc:
        if exchange.headers_sent:
            raise  # the client connection is dropped: a cut body must not look complete
        raise ApiError(502, "AGENT_UNAVAILABLE", {"reason": str(exc)}) from exc
