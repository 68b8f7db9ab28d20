"""The bridge from the front server to an ASGI application (the Quart-Trio control app): one h11
exchange becomes one ASGI `http` call. Request bodies are handed over chunk by chunk as the app asks
for them; the response is written as the app sends it. HTTP only: websockets are data-plane routes.
A body with broken framing reaches the app as a disconnect (it has no body to read), and the client
gets the front server's 400 for it, not whatever the app makes of a half-read request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .errors import ApiError
from .server import ClientGone, Exchange, Handler

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                    Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


def asgi_handler(app: ASGIApp, server: tuple[str, int] | None = None) -> Handler:
    async def handle(exchange: Exchange, params: dict[str, str]) -> None:
        request = exchange.request
        raw_path, _, query = request.target.partition("?")
        client = None
        if request.client:
            host, _, port = request.client.rpartition(":")
            client = (host, int(port))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(),
            "method": request.method,
            "scheme": request.scheme,
            "path": request.path,
            "raw_path": raw_path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "root_path": "",
            "headers": request.headers,
            "client": client,
            "server": server,
            "state": {},
        }
        body = exchange.body()
        body_done = False
        framing: ApiError | None = None
        status = 0
        headers: list[tuple[bytes, bytes]] = []

        async def receive() -> dict[str, Any]:
            nonlocal body_done, framing
            if body_done:
                # The whole body was delivered; there is nothing more until the app is done.
                await trio.sleep_forever()
            try:
                chunk = await body.__anext__()
            except StopAsyncIteration:
                body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            except ClientGone:
                body_done = True
                return {"type": "http.disconnect"}
            except ApiError as error:  # the body's framing is broken (server.bad_framing)
                body_done, framing = True, error
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, headers
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
            elif kind == "http.response.body":
                if not exchange.headers_sent:
                    await exchange.send_head(status, headers)
                await exchange.send_data(message.get("body", b""))
                if not message.get("more_body", False):
                    await exchange.end()

        await app(scope, receive, send)
        if framing is not None and not exchange.headers_sent:
            raise framing
        if not exchange.headers_sent:
            if status:
                await exchange.send_head(status, headers)
                await exchange.end()
            else:
                raise ApiError(500)
        if not body_done:
            # The app answered without reading the whole body: do not keep the connection.
            await body.aclose()  # type: ignore[attr-defined]  # an async generator

    return handle
