"""IDE sessions under the one access rule, on the real gateway with a real dev container: a link token
works once; disabling the account cuts its IDE websockets at once and refuses its cookies; a billing
suspension of the dev container refuses its IDE."""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import ConnectionClosed

from control.cluster import SERVER_SUSPENDED
from storage import billing as store_billing
from storage import cluster as store_cluster
from storage.db import is_postgres
from storage.models import database
from tests.control.test_accounts import admin_session, in_db
from tests.ide.conftest import DevIde, echoed


async def test_an_ide_link_token_works_once(ide: DevIde) -> None:
    token = await ide.token()
    first = await ide.get(f"/__ide/{ide.id}/?token={token}")
    assert first.status_code == 302, first.text
    cookie = first.headers["set-cookie"].split(";")[0]
    replayed = await ide.get(f"/__ide/{ide.id}/?token={token}")
    assert replayed.status_code == 401 and replayed.json()["error"] == "TOKEN_ALREADY_USED"
    assert "set-cookie" not in replayed.headers
    echoed(await ide.get(f"/__ide/{ide.id}/", {"cookie": cookie}))  # the session it made goes on


async def test_disabling_the_account_cuts_its_ide_websocket_and_refuses_its_cookie(ide: DevIde) -> None:
    gateway = ide.gateway
    admin = await admin_session(gateway)
    cookie = await ide.path_cookie()
    origin = (b"origin", f"http://127.0.0.1:{ide.port}".encode())
    async with ide.websocket(f"/__ide/{ide.id}/", [origin, (b"cookie", cookie.encode())]) as ws:
        await ws.get_message()
        disabled = await gateway.client.post(f"/api/admin/users/{ide.session['user']['id']}/disable",
                                             headers=gateway.bearer(admin))
        assert disabled.status_code == 200, disabled.text
        cut = trio.current_time()
        with trio.fail_after(5), pytest.raises(ConnectionClosed):
            await ws.get_message()
        assert trio.current_time() - cut < 2  # by the event, not the 30 s re-check
    refused = await ide.get(f"/__ide/{ide.id}/", {"cookie": cookie})
    assert refused.status_code == 403 and refused.json()["error"] == "ACCOUNT_DISABLED"


async def test_a_suspended_dev_container_refuses_its_ide(ide: DevIde) -> None:
    cookie = await ide.path_cookie()
    echoed(await ide.get(f"/__ide/{ide.id}/", {"cookie": cookie}))
    await in_db(store_billing.suspend, ide.session["user"]["id"], [ide.id], "payment failed")
    with trio.fail_after(10):
        while (response := await ide.get(f"/__ide/{ide.id}/", {"cookie": cookie})).status_code == 200:
            await trio.sleep(0.2)  # the cached grant lives GRANT_CACHE_SECONDS
    assert response.status_code == 403 and response.json()["error"] == "SERVER_SUSPENDED"


async def test_a_suspension_on_another_replica_cuts_the_ide_websocket_here(ide: DevIde) -> None:
    """What the billing suspension hook of another replica sends (control/cluster.py::fleet_suspender):
    the suspension stored, then `server.suspended` by NOTIFY; this gateway cuts the IDE websocket."""
    if not is_postgres(database.obj):
        pytest.skip("cross-replica events travel by PostgreSQL NOTIFY")
    cookie = await ide.path_cookie()
    origin = (b"origin", f"http://127.0.0.1:{ide.port}".encode())
    async with ide.websocket(f"/__ide/{ide.id}/", [origin, (b"cookie", cookie.encode())]) as ws:
        await ws.get_message()
        await in_db(store_billing.suspend, ide.session["user"]["id"], [ide.id], "payment failed")
        event = {"kind": SERVER_SUSPENDED, "origin": "another-replica", "instance": ide.id, "reason": "billing"}
        await in_db(store_cluster.notify, json.dumps(event))
        with trio.fail_after(5), pytest.raises(ConnectionClosed):
            await ws.get_message()
