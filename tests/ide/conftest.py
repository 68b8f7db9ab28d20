"""A dev container with its IDE running (the reference agent's stand-in IDE, which echoes what reaches
it), reached through the real gateway on real sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from tests.conftest import Gateway


@dataclass
class DevIde:
    gateway: Gateway
    session: dict
    id: int
    browser: httpx.AsyncClient  # no cookie jar of its own: every cookie a test sends is explicit

    @property
    def port(self) -> int:
        return int(self.gateway.url.rsplit(":", 1)[1])

    @property
    def host(self) -> str:
        """This instance's IDE host name, with the gateway's port."""
        return f"dev-{self.id}.{self.gateway.settings.ide_domain}:{self.port}"

    async def token(self, session: dict | None = None, instance_id: int | None = None) -> str:
        response = await self.gateway.client.post(f"/api/dev/{instance_id or self.id}/ide-token",
                                                  headers=self.gateway.bearer(session or self.session))
        assert response.status_code == 200, response.text
        return str(response.json()["token"])

    async def get(self, target: str, headers: dict[str, str] | None = None, method: str = "GET",
                  content: bytes | None = None) -> httpx.Response:
        self.browser.cookies.clear()
        return await self.browser.request(method, target, headers=headers or {}, content=content)

    async def path_cookie(self, session: dict | None = None) -> str:
        """Trade a fresh token (of `session`, default the owner's) for the by-path IDE cookie; the
        `name=value` pair."""
        response = await self.get(f"/__ide/{self.id}/?token={await self.token(session)}")
        assert response.status_code == 302, response.text
        return response.headers["set-cookie"].split(";")[0]

    async def host_cookie(self) -> str:
        response = await self.get(f"/?token={await self.token()}", {"host": self.host})
        assert response.status_code == 302, response.text
        return response.headers["set-cookie"].split(";")[0]

    @asynccontextmanager
    async def websocket(self, resource: str, headers: list[tuple[bytes, bytes]], host: str | None = None,
                        subprotocols: list[str] | None = None) -> AsyncIterator[WebSocketConnection]:
        """A websocket through the gateway, sending `host` as Host (the TCP peer is the gateway)."""
        try:
            with trio.fail_after(15):
                async with trio.open_nursery() as nursery:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                    connection = await wrap_client_stream(nursery, stream, host or f"127.0.0.1:{self.port}",
                                                          resource, subprotocols=subprotocols, extra_headers=headers)
                    try:
                        yield connection
                    finally:
                        await connection.aclose()
                        nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _only_leaf(group) from None


def _only_leaf(group: BaseExceptionGroup) -> BaseException:
    """The one real error inside a nursery's exception group (the group itself when there are several)."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    return leaves[0] if len(leaves) == 1 else group


def echoed(response: httpx.Response) -> dict[str, Any]:
    """What the stand-in IDE saw of a proxied request."""
    assert response.status_code == 200, response.text
    return dict(json.loads(response.content))


@pytest.fixture
async def ide(gateway: Gateway) -> AsyncIterator[DevIde]:
    session = await gateway.register("dev@example.com")
    instance = await gateway.provision(session, "dev", "workspace")
    started = await gateway.client.post(f"/api/dev/{instance['id']}/codeserver/start",
                                        headers=gateway.bearer(session))
    assert started.status_code == 200, started.text
    assert started.json()["running"] is True
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as browser:
        yield DevIde(gateway, session, instance["id"], browser)
