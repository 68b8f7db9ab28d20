"""Starting a real reference agent on real sockets for the bench/agent tests, and talking to it.

`running_agent` serves one agent in a nursery on port 0 and yields an httpx client already carrying
the bearer secret; `console_frames` opens the console websocket. Everything is bounded in time so a
broken agent fails a test instead of hanging the run.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from bench.agent import AgentConfig, AgentPorts, serve_agent

SECRET = "test-secret-0123456789"
AUTH = {"authorization": f"Bearer {SECRET}"}


@dataclass
class AgentUnderTest:
    ports: AgentPorts
    client: httpx.AsyncClient
    data_dir: Path
    config: AgentConfig

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.port}"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    async def state(self) -> str:
        response = await self.client.get("/status")
        state: str = response.json()["state"]
        return state

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool],
                       timeout: float = 10.0) -> dict[str, Any]:
        """Poll /status until `predicate(status)` holds."""
        with trio.fail_after(timeout):
            while True:
                status: dict[str, Any] = (await self.client.get("/status")).json()
                if predicate(status):
                    return status
                await trio.sleep(0.02)

    async def start_game(self) -> None:
        assert (await self.client.post("/start")).status_code == 200
        await self.wait_for(lambda status: status["state"] == "running")


def agent_config(data_dir: Path, **overrides: Any) -> AgentConfig:
    base = AgentConfig(data_dir=data_dir, secret=SECRET, install_seconds=0.0, log_interval=0,
                       stop_timeout=3.0, restore_min_seconds=0.3)
    return replace(base, **overrides)


@asynccontextmanager
async def running_agent(tmp_path: Path, **overrides: Any) -> AsyncIterator[AgentUnderTest]:
    config = agent_config(tmp_path / "agent", **overrides)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(serve_agent, config)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports.port}", headers=AUTH,
                                     timeout=10.0) as client:
            agent = AgentUnderTest(ports, client, config.data_dir.resolve(), config)
            if config.install_seconds == 0:
                await agent.wait_for(lambda status: status["state"] != "installing")
            yield agent
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def console(agent: AgentUnderTest, query: str = "") -> AsyncIterator[WebSocketConnection]:
    url = f"ws://127.0.0.1:{agent.ports.port}/console{query}"
    headers = [(b"authorization", f"Bearer {SECRET}".encode())]
    async with open_websocket_url(url, extra_headers=headers) as websocket:
        yield websocket


async def next_frame(websocket: WebSocketConnection, timeout: float = 5.0) -> dict[str, Any]:
    with trio.fail_after(timeout):
        frame: dict[str, Any] = json.loads(await websocket.get_message())
        return frame


async def frames_until(websocket: WebSocketConnection, predicate: Callable[[dict[str, Any]], bool],
                       timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every frame received up to and including the first one matching `predicate`."""
    frames: list[dict[str, Any]] = []
    with trio.fail_after(timeout):
        while True:
            frames.append(await next_frame(websocket, timeout))
            if predicate(frames[-1]):
                return frames


async def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes on a fresh socket, close our side, return everything the agent answered."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head + body)
        await stream.send_eof()
        answer = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                answer += chunk
        return answer


async def send_and_vanish(port: int, head: bytes, body: bytes) -> None:
    """Send a request head and a partial body, then drop the connection mid-body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(head + body)
    await trio.sleep(0.1)
    await stream.aclose()
