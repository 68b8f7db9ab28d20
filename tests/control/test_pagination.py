"""GET /api/servers and /api/servers/:id, served on the front server (hot reads, no Quart): the plain
array the Portal reads, keyset pages (`pageSize`/`after` → `{items, next}`), tenant isolation, the error
envelope for bad query values and missing credentials, and the stored JSON columns embedded verbatim.
Real gateway on a real socket, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from storage import instances as store_instances
from storage import users as store_users
from storage.clock import utcnow
from storage.db import Store, connect_database
from tests.conftest import Gateway


def _insert_servers(owner_id: int, count: int, prefix: str, ports: list[int]) -> list[int]:
    first = store_instances.next_free_vmid()
    ids = []
    for offset in range(count):
        instance = store_instances.create_instance(
            vmid=first + offset, owner=owner_id, kind="game", name=f"{prefix}-{offset}", engine_type="minecraft",
            payload={}, allocated_ports=ports, provider="local", agent_host="127.0.0.1", agent_port=1,
            agent_secret="s", state="ready", ready_at=utcnow())
        ids.append(int(instance.get_id()))
    return ids


async def _servers(gateway: Gateway, owner_id: int, count: int, prefix: str, ports: list[int] | None = None,
                   ) -> list[int]:
    store = Store(connect_database(gateway.settings.database_url), threads=1)
    return await store.run(_insert_servers, owner_id, count, prefix, ports or [])


async def _get(gateway: Gateway, session: dict[str, Any], path: str) -> Any:
    response = await gateway.client.get(path, headers=gateway.bearer(session))
    assert response.status_code == 200, response.text
    return response.json()


async def test_servers_page_by_id_and_the_plain_array_stays_the_default(gateway: Gateway) -> None:
    alice = await gateway.register("alice@example.com")
    bob = await gateway.register("bob@example.com")
    mine = await _servers(gateway, alice["user"]["id"], 5, "alice", ports=[25565, 25566])
    await _servers(gateway, bob["user"]["id"], 3, "bob")

    everything = await _get(gateway, alice, "/api/servers")
    assert isinstance(everything, list) and [s["id"] for s in everything] == mine
    assert everything[0]["allocatedPorts"] == [25565, 25566] and everything[0]["players"] == []
    assert everything[0]["resources"] is None and everything[0]["agent"]["lastSeenAt"] is None

    first = await _get(gateway, alice, "/api/servers?pageSize=2")
    assert [s["id"] for s in first["items"]] == mine[:2] and first["next"] == mine[1]
    assert first["items"] == everything[:2]
    second = await _get(gateway, alice, f"/api/servers?pageSize=2&after={first['next']}")
    assert [s["id"] for s in second["items"]] == mine[2:4] and second["next"] == mine[3]
    last = await _get(gateway, alice, f"/api/servers?pageSize=2&after={second['next']}")
    assert [s["id"] for s in last["items"]] == mine[4:] and last["next"] is None
    exact = await _get(gateway, alice, "/api/servers?pageSize=5")
    assert len(exact["items"]) == 5 and exact["next"] is None  # a full last page says there is no next one
    default_size = await _get(gateway, alice, "/api/servers?after=0")
    assert [s["id"] for s in default_size["items"]] == mine and default_size["next"] is None
    assert (await _get(gateway, alice, "/api/servers/"))[0]["id"] == mine[0]  # trailing slash, as Quart allowed


async def test_an_admin_pages_through_every_tenants_servers(gateway: Gateway) -> None:
    admin = await gateway.register("admin@example.com")
    user = await gateway.register("user@example.com")
    theirs = await _servers(gateway, user["user"]["id"], 7, "user")
    store = Store(connect_database(gateway.settings.database_url), threads=1)
    await store.run(store_users.set_role, admin["user"]["id"], "admin")
    login = await gateway.client.post("/api/auth/login", json={"email": "admin@example.com",
                                                               "password": "password123"})
    assert login.status_code == 200, login.text
    seen: list[int] = []
    after = None
    while True:
        page = await _get(gateway, login.json(), "/api/servers?pageSize=3" + (f"&after={after}" if after else ""))
        seen += [s["id"] for s in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert seen == theirs
    assert (await _get(gateway, login.json(), f"/api/servers/{theirs[0]}"))["name"] == "user-0"


async def test_another_tenants_server_is_not_found_and_bad_pages_are_refused(gateway: Gateway) -> None:
    alice = await gateway.register("alice@example.com")
    bob = await gateway.register("bob@example.com")
    (bobs,) = await _servers(gateway, bob["user"]["id"], 1, "bob")
    hidden = await gateway.client.get(f"/api/servers/{bobs}", headers=gateway.bearer(alice))
    assert hidden.status_code == 404 and hidden.json() == {"error": "SERVER_NOT_FOUND", "details": {"id": bobs}}
    assert await _get(gateway, alice, "/api/servers") == []
    assert await _get(gateway, alice, f"/api/servers?pageSize=10&after={bobs - 1}") == {"items": [], "next": None}
    for query in ("pageSize=0", "pageSize=501", "pageSize=ten", "after=-1", "pageSize=1e3", "after=" + "9" * 40):
        refused = await gateway.client.get(f"/api/servers?{query}", headers=gateway.bearer(alice))
        assert refused.status_code == 400, (query, refused.text)
        assert refused.json()["error"] == "VALIDATION_FAILED"
        assert refused.json()["details"][0]["field"] == query.split("=")[0]
    anonymous = await gateway.client.get("/api/servers")
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "UNAUTHORIZED"
    assert anonymous.headers["www-authenticate"] == "Bearer"


async def test_polled_json_columns_reach_the_answer_as_stored(gateway: Gateway) -> None:
    session = await gateway.register()
    (server,) = await _servers(gateway, session["user"]["id"], 1, "polled")
    store = Store(connect_database(gateway.settings.database_url), threads=1)
    at = utcnow()
    status = {"state": "running", "players": [{"name": "ünï", "uuid": "x"}], "operations": [{"kind": "backup"}],
              "resources": {"cpu": 0.25, "memoryMb": 512}}
    # The gateway's own poller finds no agent on port 1 and records it as down, which keeps what the
    # last successful poll stored in these columns: the answer below does not race it.
    await store.run(store_instances.record_polls, [store_instances.PollResult(
        server, alive=True, ready=True, checked_at=at, status=status)])
    body = await _get(gateway, session, f"/api/servers/{server}")
    assert body["players"] == status["players"] and body["operations"] == status["operations"]
    assert body["resources"] == status["resources"]
    listed = await _get(gateway, session, "/api/servers")
    assert listed[0]["players"] == status["players"]


async def test_openapi_documents_the_page_parameters(gateway: Gateway) -> None:
    document = (await gateway.client.get("/openapi.json")).json()
    operation = document["paths"]["/api/servers"]["get"]
    names = {p["name"]: p for p in operation["parameters"]}
    assert names["pageSize"]["schema"]["maximum"] == 500 and names["after"]["in"] == "query"
    shapes = operation["responses"]["200"]["content"]["application/json"]["schema"]["oneOf"]
    assert shapes[0]["type"] == "array" and shapes[1]["required"] == ["items", "next"]


async def test_a_token_verified_once_still_expires_on_time(gateway: Gateway) -> None:
    """The hot reads skip re-verifying a signature they already checked (control/auth/tokens.py), never
    the expiry: moving the clock past it gives 401 TOKEN_EXPIRED on the next read."""
    from storage import clock

    session = await gateway.register()
    assert await _get(gateway, session, "/api/servers") == []
    clock.offset = timedelta(hours=2)
    try:
        expired = await gateway.client.get("/api/servers", headers=gateway.bearer(session))
    finally:
        clock.offset = timedelta(0)
    assert expired.status_code == 401 and expired.json()["error"] == "TOKEN_EXPIRED"
    forged = session["accessToken"][:-4] + ("AAAA" if not session["accessToken"].endswith("AAAA") else "BBBB")
    refused = await gateway.client.get("/api/servers", headers={"authorization": f"Bearer {forged}"})
    assert refused.status_code == 401 and refused.json()["error"] == "INVALID_TOKEN"


def test_the_response_encoder_answers_what_json_dumps_answered() -> None:
    from dataclasses import dataclass
    from datetime import datetime

    from control.api import json_bytes

    @dataclass
    class Point:
        x: int

    moment = datetime(2026, 12, 3, 10, 0, 0)
    data = {"at": moment, "big": 10**30, 7: "seven", "p": Point(1), "text": "ünï"}
    assert json.loads(json_bytes(data)) == json.loads(json.dumps(data, default=str))
    assert json.loads(json_bytes({"at": moment, 7: [1.5, None]})) == {"at": str(moment), "7": [1.5, None]}
