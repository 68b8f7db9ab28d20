"""The built-in stand-in for code-server, served on the agent's IDE port when no real one is set.

It answers like a transparent test double, so tests can see what reaches the container through the
gateway's IDE proxy: `GET /healthz` is 200; any other request answers 200 with a JSON echo of its
method, path, raw query, headers and body size; a websocket at any path first sends a JSON frame of
the path, query and upgrade headers, then echoes every message back. `GET /__bench/bytes?n=N`
streams N zero bytes for download benchmarks. It asks for no credentials (the gateway in front of
it authenticates) and must never hold a request body: it counts and drops it.
"""

from __future__ import annotations

import json

from bench.agent.http import (
    ApiError,
    BodySender,
    Outcome,
    Request,
    Response,
    StreamBody,
    WebsocketUpgrade,
    json_response,
)
from bench.agent.websocket import WebSocket

ZERO_CHUNK = bytes(1 << 20)


def zero_bytes(count: int) -> StreamBody:
    async def produce(send: BodySender) -> None:
        view = memoryview(ZERO_CHUNK)
        remaining = count
        while remaining:
            piece = min(remaining, len(ZERO_CHUNK))
            await send(view[:piece])
            remaining -= piece

    return StreamBody(count, produce)


def echo_of(request: Request) -> dict[str, object]:
    return {"method": request.method, "path": request.path, "query": request.raw_query,
            "headers": request.headers}


async def serve_ide_request(request: Request) -> Outcome:
    if request.is_websocket_upgrade:
        offered = request.headers.get("sec-websocket-protocol", "")
        first_offered = offered.split(",")[0].strip() or None

        async def run(websocket: WebSocket) -> None:
            await echo_messages(websocket, request)

        return WebsocketUpgrade(run, subprotocol=first_offered)
    if request.path == "/healthz":
        return json_response({"status": "alive"})
    if request.path == "/__bench/bytes":
        count = request.query.get("n", "")
        if not count.isdigit():
            raise ApiError(400, "BAD_REQUEST", {"query": "n", "reason": "integer required"})
        return Response(200, [("content-type", "application/octet-stream")],
                        zero_bytes(int(count)))
    body_bytes = 0
    while (chunk := await request.receive_chunk()) is not None:
        body_bytes += len(chunk)
    return json_response({**echo_of(request), "bodyBytes": body_bytes})


async def echo_messages(websocket: WebSocket, request: Request) -> None:
    await websocket.send(json.dumps(echo_of(request)))
    while (message := await websocket.receive()) is not None:
        await websocket.send(message)
