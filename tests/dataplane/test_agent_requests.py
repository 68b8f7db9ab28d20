"""What reaches an agent when a client puts hostile bytes in an id or a file path: a real reference agent
behind a tap — a loopback relay that passes every byte unchanged and parses what the gateway sends with
a second HTTP implementation (llhttp) — so each case is checked by the requests the agent was sent.
A `%0D%0A` in a mod, backup or upload id, or in a file path, is one well-formed request with the value
percent-encoded; a name no filesystem can hold is a 400 and no request at all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

import httptools
import pytest
import trio

from storage import instances as store_instances
from storage.db import connect_database
from tests.conftest import Gateway

POLLER_TARGETS = ("/ready", "/status", "/health")


class _Recorder:
    """llhttp callbacks: one (method, target) per complete request."""

    def __init__(self, requests: list[tuple[str, str]]) -> None:
        self.requests = requests
        self.url = b""
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.requests.append((self.parser.get_method().decode(), self.url.decode("latin-1")))
        self.url = b""


@dataclass
class AgentTap:
    agent_host: str
    agent_port: int
    requests: list[tuple[str, str]] = field(default_factory=list)
    unparseable: list[bytes] = field(default_factory=list)
    port: int = 0

    def sent_since(self, mark: int) -> list[tuple[str, str]]:
        """What the gateway sent after `mark`, the poller's calls left out."""
        return [(method, target) for method, target in self.requests[mark:] if target not in POLLER_TARGETS]

    async def relay(self, client: trio.SocketStream) -> None:
        recorder = _Recorder(self.requests)
        upstream = await trio.open_tcp_stream(self.agent_host, self.agent_port)

        async def pipe(source: trio.SocketStream, sink: trio.SocketStream, parse: bool,
                       done: trio.CancelScope) -> None:
            try:
                while data := await source.receive_some(65536):
                    if parse:
                        try:
                            recorder.parser.feed_data(data)
                        except httptools.HttpParserError:
                            self.unparseable.append(data)
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            done.cancel()

        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(pipe, client, upstream, True, nursery.cancel_scope)
            nursery.start_soon(pipe, upstream, client, False, nursery.cancel_scope)


@pytest.fixture
async def tapped(gateway: Gateway, nursery: trio.Nursery) -> AsyncIterator[tuple[Gateway, dict, int, AgentTap]]:
    """A ready game server whose agent address now points at a tap in front of its real agent."""
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "tapped")
    db = connect_database(gateway.settings.database_url)
    with db.connection_context(), db.bind_ctx([store_instances.Instance]):
        row = store_instances.Instance.get_by_id(instance["id"])
        tap = AgentTap(row.agent_host, row.agent_port)
        listeners = await nursery.start(partial(trio.serve_tcp, tap.relay, 0, host="127.0.0.1"))
        tap.port = listeners[0].socket.getsockname()[1]
        store_instances.Instance.update(agent_port=tap.port).where(
            store_instances.Instance.id == instance["id"]).execute()
    db.close()
    yield gateway, session, instance["id"], tap
    assert tap.unparseable == []


async def test_a_crlf_space_or_nul_in_an_id_or_path_is_one_request_with_it_encoded(
        tapped: tuple[Gateway, dict, int, AgentTap]) -> None:
    gateway, session, server_id, tap = tapped
    game, files = f"/api/game/servers/{server_id}", f"/api/servers/{server_id}/files"
    cases = [
        ("DELETE", f"{game}/mods/x%0D%0AX-Injected:%201", "/mods/x%0D%0AX-Injected%3A%201"),
        ("POST", f"{game}/mods/a%20b/enable", "/mods/a%20b/enable"),
        ("POST", f"{game}/mods/nul%00x/disable", "/mods/nul%00x/disable"),
        ("DELETE", f"{game}/backups/b%0D%0A%0D%0AGET%20x", "/backups/b%0D%0A%0D%0AGET%20x"),
        ("POST", f"{game}/backups/restore?id=r%0D%0AX:%201", "/backups/restore?id=r%0D%0AX%3A+1"),
        ("GET", f"{files}/uploads/u%0D%0Ax", "/files/uploads/u%0D%0Ax"),
        ("DELETE", f"{files}/uploads/u%20x", "/files/uploads/u%20x"),
        ("GET", f"{files}/content?path=a%0D%0Ab%20c", "/files/content?path=a%0D%0Ab+c"),
        ("GET", f"{files}?path=d%0D%0A", "/files?path=d%0D%0A"),
        # the data plane's streams
        ("GET", f"{files}/download?path=a%0D%0Ab&other=%0D%0A", "/files/download?path=a%0D%0Ab"),
        ("PUT", f"{files}/upload?path=up%20%0D%0A.txt", "/files/upload?path=up+%0D%0A.txt"),
    ]
    for method, path, expected in cases:
        mark = len(tap.requests)
        response = await gateway.client.request(method, path, headers=gateway.bearer(session),
                                                content=b"data" if method == "PUT" else None)
        assert response.status_code < 500, (path, response.status_code, response.text)
        assert tap.sent_since(mark) == [(method, expected)], path


async def test_names_no_filesystem_can_hold_are_400_before_the_agent(
        tapped: tuple[Gateway, dict, int, AgentTap]) -> None:
    gateway, session, server_id, tap = tapped
    game, files = f"/api/game/servers/{server_id}", f"/api/servers/{server_id}/files"
    long_name, long_path = "n" * 5000, "a/" * 2100
    cases = [
        ("GET", f"{files}/content", {"path": long_name}, None, 400, "NAME_TOO_LONG"),
        ("GET", f"{files}/content", {"path": long_path}, None, 400, "PATH_TOO_LONG"),
        ("DELETE", files, {"path": "a\x00b"}, None, 400, "INVALID_PATH"),
        ("GET", files, {"path": "ok/" + "é" * 128}, None, 400, "NAME_TOO_LONG"),
        ("GET", f"{files}/download", {"path": long_name}, None, 400, "NAME_TOO_LONG"),
        ("PUT", f"{files}/upload", {"path": long_path}, None, 400, "PATH_TOO_LONG"),
        ("GET", f"{files}/download", {"path": "x"}, None, 400, "BAD_REQUEST"),  # see the raw query below
        ("POST", f"{files}/mkdir", None, {"path": long_name}, 422, "VALIDATION_FAILED"),
        ("POST", f"{files}/rename", None, {"from": "a", "to": long_path}, 422, "VALIDATION_FAILED"),
        ("PUT", f"{files}/content", None, {"path": "a\x00b", "content": ""}, 422, "VALIDATION_FAILED"),
        ("DELETE", f"{game}/mods/{'m' * 300}", None, None, 400, "NAME_TOO_LONG"),
        ("DELETE", f"{game}/backups/%2E%2E", None, None, 400, "INVALID_PATH_SEGMENT"),
    ]
    mark = len(tap.requests)
    for method, path, params, body, status, code in cases:
        if params == {"path": "x"}:
            path, params = f"{path}?path=%FF%FE", None  # not UTF-8: no path to check, so none sent
        response = await gateway.client.request(method, path, params=params, json=body,
                                                headers=gateway.bearer(session),
                                                content=b"data" if method == "PUT" and body is None else None)
        assert (response.status_code, response.json()["error"]) == (status, code), (method, path, response.text)
    assert tap.sent_since(mark) == []
