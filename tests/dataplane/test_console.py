"""The websocket console through the gateway, with real websocket clients and real agents."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from control.auth.tokens import TokenKind, TokenService
from control.config import Settings
from tests.conftest import TEST_SECRET, Gateway
from tests.control.test_auth import _mail_token
from tests.dataplane.helpers import kill_agent


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.console_limits = replace(settings.console_limits, commands_per_second=100_000, command_burst=100_000)
    return settings


@pytest.fixture
async def server(gateway: Gateway) -> tuple[Gateway, dict, dict]:
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "console")
    await gateway.wait_for(lambda b: b["state"] == "running", f"/api/servers/{instance['id']}", session)
    return gateway, session, instance


def ws_url(gateway: Gateway, server_id: int) -> str:
    return gateway.url.replace("http://", "ws://") + f"/api/servers/{server_id}/console"


async def console_token(gateway: Gateway, session: dict, server_id: int) -> str:
    response = await gateway.client.post(f"/api/servers/{server_id}/console/token", headers=gateway.bearer(session))
    assert response.status_code == 200, response.text
    return response.json()["token"]


async def lines_until(ws, predicate, timeout: float = 20.0) -> list[dict]:  # type: ignore[no-untyped-def]
    seen: list[dict] = []
    with trio.fail_after(timeout):
        while True:
            frame = json.loads(await ws.get_message())
            if frame.get("type") == "line":
                seen.append(frame)
                if predicate(frame):
                    return seen


async def authenticate(ws, token: str, **extra: object) -> None:  # type: ignore[no-untyped-def]
    await ws.send_message(json.dumps({"type": "auth", "token": token, **extra}))
    assert json.loads(await ws.get_message())["type"] == "ready"


async def close_code(ws) -> int:  # type: ignore[no-untyped-def]
    """Read until the gateway closes the socket; its close code."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await ws.get_message()
    return closed.value.reason.code


async def test_ten_thousand_commands_round_trip_in_order(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    token = await console_token(gateway, session, instance["id"])
    with trio.fail_after(120):
        async with open_websocket_url(ws_url(gateway, instance["id"])) as ws:
            await authenticate(ws, token)
            expected = 0
            batch = 200
            for start in range(0, 10_000, batch):
                for n in range(start, start + batch):
                    await ws.send_message(json.dumps({"type": "command", "command": f"echo cmd-{n}"}))
                while expected < start + batch:
                    frame = json.loads(await ws.get_message())
                    if frame.get("type") == "line" and frame["data"].startswith("cmd-"):
                        assert frame["data"] == f"cmd-{expected}"
                        expected += 1
            assert expected == 10_000


async def test_two_clients_see_the_same_output_and_reconnect_resumes(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    url = ws_url(gateway, instance["id"])
    token = await console_token(gateway, session, instance["id"])
    with trio.fail_after(60):
        async with open_websocket_url(url) as first, open_websocket_url(url) as second:
            for ws in (first, second):
                await authenticate(ws, token)
            await first.send_message(json.dumps({"type": "command", "command": "say shared-line"}))
            a = await lines_until(first, lambda f: "shared-line" in f["data"])
            b = await lines_until(second, lambda f: "shared-line" in f["data"])
            assert a[-1]["seq"] == b[-1]["seq"] and a[-1]["data"] == b[-1]["data"]
            last_seen = a[-1]["seq"]
        # While nobody watches, more output happens.
        for n in range(5):
            await gateway.client.post(f"/api/servers/{instance['id']}/console/command",
                                      headers=gateway.bearer(session), json={"command": f"echo missed-{n}"})
        async with open_websocket_url(url) as again:
            await authenticate(again, token, since=last_seen)
            replay = await lines_until(again, lambda f: f["data"] == "missed-4")
            seqs = [f["seq"] for f in replay]
            assert seqs[0] == last_seen + 1 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            assert [f["data"] for f in replay if f["data"].startswith("missed-")] == [f"missed-{n}" for n in range(5)]


async def close_code_on_connect(url: str, first_frame: str | None) -> int:
    with trio.fail_after(20):
        async with open_websocket_url(url) as ws:
            if first_frame is not None:
                await ws.send_message(first_frame)
            return await close_code(ws)


async def test_bad_tokens_are_refused_with_distinct_codes(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    url = ws_url(gateway, instance["id"])
    service = TokenService(TEST_SECRET, "zlh-gateway")
    forged = TokenService("another-key-" + "z" * 40, "zlh-gateway").issue(
        TokenKind.CONSOLE, session["user"]["id"], 60, sid=instance["id"])
    from datetime import timedelta

    from storage import clock

    clock.offset = timedelta(minutes=-30)
    try:
        expired = service.issue(TokenKind.CONSOLE, session["user"]["id"], 60, sid=instance["id"])
    finally:
        clock.offset = timedelta(0)
    other = await gateway.register("intruder@example.com")
    other_token = service.issue(TokenKind.CONSOLE, other["user"]["id"], 60, sid=instance["id"])
    wrong_server = service.issue(TokenKind.CONSOLE, session["user"]["id"], 60, sid=instance["id"] + 1)
    access_token = session["accessToken"]
    assert await close_code_on_connect(url, json.dumps({"type": "auth", "token": forged})) == 4001
    assert await close_code_on_connect(url, json.dumps({"type": "auth", "token": expired})) == 4001
    assert await close_code_on_connect(url, json.dumps({"type": "auth", "token": access_token})) == 4001
    assert await close_code_on_connect(url, json.dumps({"type": "auth", "token": other_token})) == 4004
    assert await close_code_on_connect(url, json.dumps({"type": "auth", "token": wrong_server})) == 4010
    assert await close_code_on_connect(url, json.dumps({"type": "command", "command": "list"})) == 4001


async def test_agent_death_closes_the_client(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    token = await console_token(gateway, session, instance["id"])
    with trio.fail_after(30):
        async with open_websocket_url(ws_url(gateway, instance["id"])) as ws:
            await authenticate(ws, token)
            kill_agent(gateway, instance["vmid"])
            assert await close_code(ws) in (1001, 1011)


async def test_client_close_releases_the_session(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    token = await console_token(gateway, session, instance["id"])
    with trio.fail_after(30):
        async with open_websocket_url(ws_url(gateway, instance["id"])) as ws:
            await authenticate(ws, token)
        while True:
            metrics = (await gateway.client.get("/metrics")).text
            if "zlh_console_connections 0.0" in metrics:
                break
            await trio.sleep(0.05)


@pytest.fixture
def short_tokens(settings: Settings) -> Settings:
    settings.console_token_ttl = 4
    settings.console_limits = replace(settings.console_limits, warn_before_expiry=2.5, per_server_connections=2,
                                      max_message_bytes=1024)
    return settings


async def test_expiry_is_announced_and_re_auth_keeps_the_socket(short_tokens: Settings,
                                                                server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    url = ws_url(gateway, instance["id"])
    with trio.fail_after(30):
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"type": "auth", "token": await console_token(gateway, session,
                                                                                            instance["id"])}))
            first = json.loads(await ws.get_message())
            assert first["type"] == "ready"
            while (frame := json.loads(await ws.get_message()))["type"] != "token-expiring":
                pass
            assert frame["expiresAt"] == first["expiresAt"]
            await ws.send_message(json.dumps({"type": "auth", "token": await console_token(gateway, session,
                                                                                            instance["id"])}))
            while (frame := json.loads(await ws.get_message()))["type"] != "ready":
                pass
            assert frame["expiresAt"] > first["expiresAt"]
            # Without another re-auth the socket closes with 4001 when the new token runs out.
            assert await close_code(ws) == 4001


async def test_connection_cap_and_message_size_limit(short_tokens: Settings,
                                                     server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    url = ws_url(gateway, instance["id"])
    token = await console_token(gateway, session, instance["id"])
    with trio.fail_after(30):
        async with open_websocket_url(url) as one, open_websocket_url(url) as two:
            for ws in (one, two):
                await authenticate(ws, token)
            assert await close_code_on_connect(url, json.dumps({"type": "auth", "token": token})) == 4009
            await one.send_message(json.dumps({"type": "command", "command": "x" * 4096}))
            assert await close_code(one) == 1009


async def test_a_password_reset_closes_the_accounts_consoles_with_4010(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    token = await console_token(gateway, session, instance["id"])
    with trio.fail_after(30):
        async with open_websocket_url(ws_url(gateway, instance["id"])) as ws:
            await authenticate(ws, token)
            email = session["user"]["email"]
            await gateway.client.post("/api/auth/password-reset/request", json={"email": email})
            reset = _mail_token(gateway.settings.data_dir / "outbox")
            done = await gateway.client.post("/api/auth/password-reset/confirm",
                                             json={"token": reset, "password": "a-new-password-1"})
            assert done.status_code == 200, done.text
            assert await close_code(ws) == 4010
