"""The built-in stand-in IDE on the agent's IDE port, switched by /dev/codeserver/*."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest
import trio
from agent_harness import running_agent
from trio_websocket import open_websocket_url


@pytest.mark.trio
async def test_builtin_ide_echoes_http_and_websocket_only_while_started(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        ide_url = f"http://127.0.0.1:{agent.ports.ide_port}"
        assert (await agent.client.get("/dev/codeserver")).json() == {
            "running": False, "port": agent.ports.ide_port, "mode": "builtin"}
        async with httpx.AsyncClient(base_url=ide_url) as browser:
            with pytest.raises(httpx.ConnectError):
                await browser.get("/healthz")
            started = await agent.client.post("/dev/codeserver/start")
            assert started.json() == {"running": True, "port": agent.ports.ide_port,
                                      "mode": "builtin"}
            assert (await browser.get("/healthz")).status_code == 200
            echo = await browser.get("/some/page", params={"folder": "/work"},
                                     headers={"x-forwarded-host": "dev-7.example"})
            assert echo.status_code == 200
            body = echo.json()
            assert body["method"] == "GET" and body["path"] == "/some/page"
            assert body["query"] == "folder=%2Fwork"
            assert body["headers"]["x-forwarded-host"] == "dev-7.example"
            assert "authorization" not in body["headers"]
            posted = await browser.post("/upload-sink", content=b"z" * 100_000)
            assert posted.json()["bodyBytes"] == 100_000
            payload = await browser.get("/__bench/bytes", params={"n": 3_000_000})
            assert payload.content == bytes(3_000_000)

            url = f"ws://127.0.0.1:{agent.ports.ide_port}/stable-abc/ws?reconnection=false"
            with trio.fail_after(5):
                async with open_websocket_url(url, extra_headers=[(b"x-probe", b"1")],
                                              subprotocols=["vscode"]) as websocket:
                    hello = json.loads(await websocket.get_message())
                    assert hello["path"] == "/stable-abc/ws"
                    assert hello["query"] == "reconnection=false"
                    assert hello["headers"]["x-probe"] == "1"
                    assert websocket.subprotocol == "vscode"
                    await websocket.send_message("ping text")
                    assert await websocket.get_message() == "ping text"
                    await websocket.send_message(b"\x00\x01binary")
                    assert await websocket.get_message() == b"\x00\x01binary"

            stopped = await agent.client.post("/dev/codeserver/stop")
            assert stopped.json()["running"] is False
            with pytest.raises(httpx.ConnectError):
                await browser.get("/healthz")
            restarted = await agent.client.post("/dev/codeserver/restart")
            assert restarted.json()["running"] is True
            assert (await browser.get("/healthz")).status_code == 200


@pytest.mark.trio
async def test_codeserver_command_is_started_and_stopped_on_the_ide_port(tmp_path: Path) -> None:
    command = f"{sys.executable} -m http.server {{port}} --bind 127.0.0.1 --directory {{data}}"
    async with running_agent(tmp_path, codeserver_command=command) as agent:
        ide_url = f"http://127.0.0.1:{agent.ports.ide_port}/"
        started = await agent.client.post("/dev/codeserver/start")
        assert started.json() == {"running": True, "port": agent.ports.ide_port,
                                  "mode": "command"}
        async with httpx.AsyncClient() as browser:
            assert (await browser.get(ide_url)).status_code == 200
            assert (await agent.client.post("/dev/codeserver/stop")).json()["running"] is False
            with pytest.raises(httpx.ConnectError):
                await browser.get(ide_url)
