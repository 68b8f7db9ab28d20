"""The reference agent's auth, readiness, game lifecycle and console, over real sockets."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio
from agent_harness import (
    SECRET,
    console,
    frames_until,
    next_frame,
    running_agent,
)
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url


@pytest.mark.trio
async def test_every_route_requires_the_bearer_secret(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        async with httpx.AsyncClient(base_url=agent.base_url) as anonymous:
            for method, path in [("GET", "/health"), ("GET", "/status"), ("POST", "/start"),
                                 ("GET", "/files"), ("GET", "/nowhere")]:
                response = await anonymous.request(method, path)
                assert response.status_code == 401
                assert response.json() == {"error": "UNAUTHORIZED", "details": None}
            wrong = await anonymous.get("/health", headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401
            right = await anonymous.get("/health", headers={"authorization": f"Bearer {SECRET}"})
            assert right.json() == {"ok": True}
        with trio.fail_after(5), pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(f"ws://127.0.0.1:{agent.ports.port}/console"):
                pass
        assert rejected.value.status_code == 401


@pytest.mark.trio
async def test_not_ready_while_installing_then_ready(tmp_path: Path) -> None:
    async with running_agent(tmp_path, install_seconds=0.5) as agent:
        ready = await agent.client.get("/ready")
        assert ready.status_code == 200
        assert ready.json() == {"ready": False, "state": "installing"}
        assert (await agent.client.post("/start")).status_code == 409
        await agent.wait_for(lambda status: status["state"] == "stopped")
        assert (await agent.client.get("/ready")).json() == {"ready": True, "state": "stopped"}


@pytest.mark.trio
async def test_unknown_route_is_404_and_wrong_method_405(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        missing = await agent.client.get("/no/such/route")
        assert missing.status_code == 404
        assert missing.json()["error"] == "NOT_FOUND"
        wrong = await agent.client.delete("/status")
        assert wrong.status_code == 405
        assert wrong.json()["error"] == "METHOD_NOT_ALLOWED"
        assert wrong.headers["allow"] == "GET"


@pytest.mark.trio
async def test_start_stop_conflicts_and_crash_are_reported(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        stop_stopped = await agent.client.post("/stop")
        assert stop_stopped.status_code == 409
        assert stop_stopped.json()["error"] == "CONFLICT"
        assert (await agent.client.post("/start")).json() == {"state": "starting"}
        await agent.wait_for(lambda status: status["state"] == "running")
        assert (await agent.client.post("/start")).status_code == 409
        await agent.client.post("/console/command", json={"command": "join Alex"})
        status = await agent.wait_for(lambda status: status["playerCount"] == 1)
        assert status["players"] == [{"name": "Alex"}]
        assert status["resources"]["memoryBytes"] > 0
        assert (await agent.client.post("/console/command", json={"command": "crash"})).json() == {
            "accepted": True}
        await agent.wait_for(lambda status: status["state"] == "crashed")
        assert (await agent.client.post("/start")).json() == {"state": "starting"}
        await agent.wait_for(lambda status: status["state"] == "running")
        assert (await agent.client.post("/restart")).json() == {"state": "stopping"}
        await agent.wait_for(lambda status: status["state"] == "running")
        assert (await agent.client.post("/stop")).json() == {"state": "stopping"}
        await agent.wait_for(lambda status: status["state"] == "stopped")


@pytest.mark.trio
async def test_console_command_validation_and_conflict(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        stopped = await agent.client.post("/console/command", json={"command": "list"})
        assert stopped.status_code == 409
        bad_json = await agent.client.post("/console/command", content=b"{not json")
        assert bad_json.status_code == 400
        assert bad_json.json()["error"] == "BAD_REQUEST"
        missing = await agent.client.post("/console/command", json={"cmd": "list"})
        assert missing.status_code == 400
        assert missing.json()["details"]["field"] == "command"


@pytest.mark.trio
async def test_update_applies_only_while_stopped(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        assert (await agent.client.get("/update")).json() == {
            "updateAvailable": True, "current": "1.20.1", "latest": "1.20.2"}
        applied = await agent.client.post("/update")
        assert applied.json()["updated"] is True
        assert (await agent.client.get("/version")).json() == {"version": "1.20.2"}
        await agent.start_game()
        assert (await agent.client.post("/update")).status_code == 409


@pytest.mark.trio
async def test_echo_command_comes_back_on_the_console_with_seq(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        await agent.start_game()
        async with console(agent) as websocket:
            accepted = await agent.client.post("/console/command", json={"command": "echo hello"})
            assert accepted.json() == {"accepted": True}
            frames = await frames_until(websocket, lambda f: f.get("data") == "hello")
            lines = [frame for frame in frames if frame["type"] == "line"]
            assert any("Done (" in line["data"] for line in lines)
            seqs = [line["seq"] for line in lines]
            assert seqs == list(range(1, len(seqs) + 1))
            assert {"type": "state", "state": "running"}.items() <= next(
                f for f in frames if f["type"] == "state").items()
            await websocket.send_message(json.dumps({"type": "command", "command": "echo world"}))
            world = await frames_until(websocket, lambda f: f.get("data") == "world")
            assert world[-1]["seq"] > seqs[-1]
            await websocket.send_message("not json")
            assert (await next_frame(websocket))["type"] == "error"


@pytest.mark.trio
async def test_state_changes_stream_on_the_console(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent, console(agent) as websocket:
        assert (await next_frame(websocket))["state"] == "stopped"
        await agent.client.post("/start")
        frames = await frames_until(websocket, lambda f: f.get("state") == "running")
        states = [frame["state"] for frame in frames if frame["type"] == "state"]
        assert states == ["starting", "running"]
        banner = [frame for frame in frames if "Done (" in frame.get("data", "")]
        assert banner, "the ready line comes before the running state"


@pytest.mark.trio
async def test_since_replays_exactly_the_missing_lines(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        await agent.start_game()
        for number in range(10):
            await agent.client.post("/console/command", json={"command": f"echo line-{number}"})
        async with console(agent) as websocket:
            frames = await frames_until(websocket, lambda f: f.get("data") == "line-9")
        by_text = {frame["data"]: frame["seq"] for frame in frames if frame["type"] == "line"}
        since = by_text["line-4"]
        async with console(agent, f"?since={since}") as websocket:
            replay = await frames_until(websocket, lambda f: f["type"] == "state")
        assert [frame["data"] for frame in replay[:-1]] == [f"line-{n}" for n in range(5, 10)]
        assert [frame["seq"] for frame in replay[:-1]] == list(range(since + 1, since + 6))


@pytest.mark.trio
async def test_since_older_than_the_ring_gets_a_gap_frame_first(tmp_path: Path) -> None:
    async with running_agent(tmp_path, console_capacity=20) as agent:
        await agent.start_game()
        for number in range(30):
            await agent.client.post("/console/command", json={"command": f"echo n{number}"})
        async with console(agent) as websocket:
            await frames_until(websocket, lambda f: f.get("data") == "n29")
        async with console(agent, "?since=0") as websocket:
            gap = await next_frame(websocket)
            first_line = await next_frame(websocket)
        assert gap["type"] == "gap"
        assert gap["from"] == 1
        assert gap["to"] == first_line["seq"] - 1


@pytest.mark.trio
async def test_console_client_a_whole_ring_behind_is_closed_with_1008(tmp_path: Path) -> None:
    async with running_agent(tmp_path, console_capacity=16) as agent:
        await agent.start_game()
        async with console(agent) as websocket:
            await frames_until(websocket, lambda f: f.get("state") == "running")
            # The client reads nothing while ~20 MB of output passes: far more than the socket
            # buffers and 16 ring entries hold.
            payload = "x" * 60_000
            for number in range(350):
                await agent.client.post("/console/command",
                                        json={"command": f"echo {number} {payload}"})
            with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await websocket.get_message()
            reason = closed.value.reason
            assert reason is not None and reason.code == 1008


@pytest.mark.trio
async def test_custom_game_command_that_ignores_stop_is_terminated(tmp_path: Path) -> None:
    # `cat` echoes the console, is "running" at once (empty ready pattern) and ignores "stop".
    async with running_agent(tmp_path, game_command="cat", ready_pattern="",
                             stop_timeout=0.3) as agent, console(agent) as websocket:
        assert (await agent.client.post("/start")).json() == {"state": "running"}
        await agent.client.post("/console/command", json={"command": "hello from cat"})
        await frames_until(websocket, lambda f: f.get("data") == "hello from cat")
        assert (await agent.client.post("/stop")).json() == {"state": "stopping"}
        await frames_until(websocket, lambda f: f.get("state") == "stopped")
        assert (await agent.state()) == "stopped"
        with trio.fail_after(5):
            await websocket.ping()
