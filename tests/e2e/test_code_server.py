"""End to end with the real thing: code-server (npm) started by a reference agent in a dev container of
the local provider, reached only through the gateway, by path and by host. The test loads the workbench
page and its script, then opens the workbench's websocket the way a browser does (Origin of the page,
the IDE cookie, permessage-deflate offered) and completes VS Code's own handshake over it: an `auth`
control message answered by a `sign` one, which only a connected remote server sends.

code-server is installed, when missing, by bench/agent/code_server_install.py (what `make code-server`
runs) and started through the ZLH_LOCAL_IDE_COMMAND setting, as a newcomer's `make run` does."""

from __future__ import annotations

import json
import re
import struct
import uuid

import httpx
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    Request,
)
from wsproto.extensions import PerMessageDeflate

from bench.agent.code_server_install import InstallError, codeserver_command, install_code_server
from control.config import Settings
from tests.conftest import Gateway

pytestmark = pytest.mark.e2e

CONTROL_MESSAGE = 2  # VS Code's ProtocolMessageType.Control; header: type u8, id u32, ack u32, length u32
BROWSER_HEADERS = [(b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/130 Safari/537.36"),
                   (b"accept-language", b"en-US,en;q=0.9"), (b"pragma", b"no-cache"), (b"cache-control", b"no-cache")]


@pytest.fixture(scope="session")
def code_server() -> None:
    try:
        install_code_server()
    except InstallError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def settings(settings: Settings, code_server: None) -> Settings:
    settings.local_ide_command = codeserver_command()  # what `make code-server` + `make run` configure
    return settings


class BrowserDeflate(PerMessageDeflate):
    """permessage-deflate offered the way browsers offer it (VS Code's server declines offers that
    constrain its window, such as wsproto's default `server_max_window_bits=15`)."""

    def offer(self) -> str:
        return "client_max_window_bits"


def _control_message(payload: dict) -> bytes:
    data = json.dumps(payload).encode()
    return struct.pack(">BIII", CONTROL_MESSAGE, 0, 0, len(data)) + data


def _control_messages(buffer: bytearray) -> list[dict]:
    found = []
    while len(buffer) >= 13:
        kind, _id, _ack, length = struct.unpack(">BIII", buffer[:13])
        if len(buffer) < 13 + length:
            break
        body = bytes(buffer[13:13 + length])
        del buffer[:13 + length]
        if kind == CONTROL_MESSAGE:
            found.append(json.loads(body))
    return found


async def vscode_handshake(port: int, host: str, resource: str, origin: str, cookie: str) -> tuple[list, dict]:
    """Open the workbench websocket as a browser would and run VS Code's auth step over it.
    Returns the negotiated extensions and the server's answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    try:
        await stream.send_all(ws.send(Request(host=host, target=resource, extensions=[BrowserDeflate()],
                                              extra_headers=[(b"origin", origin.encode()),
                                                             (b"cookie", cookie.encode()), *BROWSER_HEADERS])))
        accepted: AcceptConnection | None = None
        inbound = bytearray()
        while True:
            data = await stream.receive_some(65536)
            assert data, "connection closed during the websocket exchange"
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, RejectConnection):
                    pytest.fail(f"websocket refused with HTTP {event.status_code}")
                if isinstance(event, AcceptConnection):
                    accepted = event
                    await stream.send_all(ws.send(BytesMessage(data=_control_message(
                        {"type": "auth", "auth": "00000000000000000000", "data": uuid.uuid4().hex}))))
                elif isinstance(event, BytesMessage):
                    inbound += event.data
                    for message in _control_messages(inbound):
                        assert accepted is not None
                        await stream.send_all(ws.send(CloseConnection(code=1000)))
                        return accepted.extensions, message
                elif isinstance(event, CloseConnection):
                    pytest.fail(f"websocket closed by the IDE: {event.code} {event.reason}")
    finally:
        await stream.aclose()


async def open_workbench(gateway: Gateway, base: str, host: str, cookie: str) -> str:
    """Load the workbench page under `base` (following code-server's relative redirect, as a browser
    does) and one of its scripts; return the page."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as browser:
        headers = {"host": host, "cookie": cookie}
        page = await browser.get(base, headers=headers)
        if page.status_code == 302:  # code-server: "./?folder=…", relative to the page
            location = page.headers["location"]
            assert location.startswith("./"), location
            page = await browser.get(base + location[2:], headers=headers)
        assert page.status_code == 200, page.text[:500]
        assert "workbench" in page.text
        scripts = re.findall(r'<script[^>]+src="([^"]+)"', page.text)
        relative = [s for s in scripts if s.startswith("./") or not s.startswith(("/", "http"))]
        assert relative, scripts
        script = await browser.get(base + relative[-1].removeprefix("./"), headers=headers)
        assert script.status_code == 200 and len(script.content) > 1000
        return page.text


async def _dev_with_code_server(gateway: Gateway) -> tuple[dict, int]:
    session = await gateway.register("coder@example.com")
    instance = await gateway.provision(session, "dev", "code")
    started = await gateway.client.post(f"/api/dev/{instance['id']}/codeserver/start",
                                        headers=gateway.bearer(session), timeout=90)
    assert started.status_code == 200, started.text
    assert started.json()["mode"] == "command"
    return session, instance["id"]


async def _trade(gateway: Gateway, session: dict, sid: int, path: str, host: str) -> str:
    """Open the IDE link as a browser does; the IDE cookie (`name=value`) it gets."""
    token = (await gateway.client.post(f"/api/dev/{sid}/ide-token", headers=gateway.bearer(session))).json()["token"]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as browser:
        traded = await browser.get(f"{path}?token={token}", headers={"host": host})
    assert traded.status_code == 302, traded.text
    return traded.headers["set-cookie"].split(";")[0]


async def test_code_server_workbench_and_websocket_by_path(gateway: Gateway) -> None:
    session, sid = await _dev_with_code_server(gateway)
    port = int(gateway.url.rsplit(":", 1)[1])
    host = f"127.0.0.1:{port}"
    base = f"/__ide/{sid}/"
    cookie = await _trade(gateway, session, sid, base, host)
    await open_workbench(gateway, base, host, cookie)
    extensions, answer = await vscode_handshake(
        port, host, f"{base}?reconnectionToken={uuid.uuid4()}&reconnection=false&skipWebSocketFrames=false",
        f"http://{host}", cookie)
    assert answer["type"] == "sign", answer
    assert any(isinstance(e, PerMessageDeflate) for e in extensions)


async def test_code_server_workbench_and_websocket_by_host(gateway: Gateway) -> None:
    session, sid = await _dev_with_code_server(gateway)
    port = int(gateway.url.rsplit(":", 1)[1])
    host = f"dev-{sid}.{gateway.settings.ide_domain}:{port}"
    cookie = await _trade(gateway, session, sid, "/", host)
    await open_workbench(gateway, "/", host, cookie)
    extensions, answer = await vscode_handshake(
        port, host, f"/?reconnectionToken={uuid.uuid4()}&reconnection=false&skipWebSocketFrames=false",
        f"http://{host}", cookie)
    assert answer["type"] == "sign", answer
    assert any(isinstance(e, PerMessageDeflate) for e in extensions)

