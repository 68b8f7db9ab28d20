"""A disabled account's open console websocket closes at once (real gateway, real agent), and the
console token it held is refused afterwards."""

from __future__ import annotations

import json

import trio
from trio_websocket import open_websocket_url

from tests.conftest import Gateway
from tests.control.test_accounts import admin_session
from tests.dataplane.test_console import authenticate, close_code, console_token, ws_url


async def test_disabling_an_account_closes_its_console_with_4010(gateway: Gateway) -> None:
    admin = await admin_session(gateway)
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "console")
    token = await console_token(gateway, session, instance["id"])
    with trio.fail_after(30):
        async with open_websocket_url(ws_url(gateway, instance["id"])) as ws:
            await authenticate(ws, token)
            disabled = await gateway.client.post(f"/api/admin/users/{session['user']['id']}/disable",
                                                 headers=gateway.bearer(admin))
            assert disabled.status_code == 200, disabled.text
            cut = trio.current_time()
            assert await close_code(ws) == 4010
            assert trio.current_time() - cut < 2  # by the event, not the periodic re-check
        async with open_websocket_url(ws_url(gateway, instance["id"])) as ws:
            await ws.send_message(json.dumps({"type": "auth", "token": token}))
            assert await close_code(ws) == 4010  # 403 ACCOUNT_DISABLED
