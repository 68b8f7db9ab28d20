"""Provisioning on the local provider, end to end on real sockets: real agent processes, the real
poller, the real API."""

from __future__ import annotations

import trio

from control.providers.local import process_alive
from storage import instances as store_instances
from storage.db import connect_database
from tests.conftest import Gateway


def _archive_rows(gateway: Gateway, vmid: int) -> list:
    db = connect_database(gateway.settings.database_url)
    with db.connection_context(), db.bind_ctx([store_instances.InstanceArchive]):
        rows = list(store_instances.InstanceArchive.select().where(store_instances.InstanceArchive.vmid == vmid))
    return rows


async def test_game_server_end_to_end(gateway: Gateway) -> None:
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "survival", ports=[25565])
    sid = instance["id"]
    assert instance["state"] == "reserved" and instance["allocatedPorts"] == [25565]
    listed = (await gateway.client.get("/api/instances", headers=gateway.bearer(session))).json()
    assert [i["id"] for i in listed] == [sid]
    record = (gateway.settings.data_dir / "containers" / str(instance["vmid"]) / "container.json")
    pid = __import__("json").loads(record.read_text())["pid"]

    # The local provider autostarts game servers; make sure it runs (start answers 409 if it already does).
    start = await gateway.client.post(f"/api/servers/{sid}/start", headers=gateway.bearer(session))
    assert start.status_code in (200, 409), start.text
    await gateway.wait_for(lambda b: b["state"] == "running", f"/api/servers/{sid}", session)
    command = await gateway.client.post(f"/api/servers/{sid}/console/command", headers=gateway.bearer(session),
                                        json={"command": "join alice"})
    assert command.status_code == 200, command.text
    state = await gateway.wait_for(lambda b: any(p.get("name") == "alice" for p in b["players"]),
                                   f"/api/servers/{sid}", session)
    assert state["agentReady"] is True and state["agent"]["alive"] is True
    assert state["agent"]["lastSeenAt"] is not None

    stop = await gateway.client.post(f"/api/servers/{sid}/stop", headers=gateway.bearer(session))
    assert stop.status_code == 200, stop.text
    await gateway.wait_for(lambda b: b["state"] == "stopped", f"/api/servers/{sid}", session)

    deleted = await gateway.client.delete(f"/api/containers/{instance['vmid']}", headers=gateway.bearer(session))
    assert deleted.status_code == 200, deleted.text
    archive = deleted.json()["archive"]
    assert archive["engineType"] == "minecraft" and archive["allocatedPorts"] == [25565]
    assert archive["payload"]["ports"] == [25565]
    assert len(_archive_rows(gateway, instance["vmid"])) == 1
    with trio.fail_after(10):
        while process_alive(pid):
            await trio.sleep(0.05)
    assert not record.parent.exists()
    again = await gateway.client.delete(f"/api/containers/{instance['vmid']}", headers=gateway.bearer(session))
    assert again.status_code == 404
    gone = await gateway.client.get(f"/api/servers/{sid}", headers=gateway.bearer(session))
    assert gone.status_code == 404


async def test_other_users_cannot_see_or_touch_a_server(gateway: Gateway) -> None:
    owner = await gateway.register("owner@example.com")
    other = await gateway.register("other@example.com")
    instance = await gateway.provision(owner, "dev", "code")
    sid = instance["id"]
    for method, path in (("GET", f"/api/servers/{sid}"), ("POST", f"/api/servers/{sid}/start"),
                         ("DELETE", f"/api/containers/{instance['vmid']}")):
        response = await gateway.client.request(method, path, headers=gateway.bearer(other))
        assert response.status_code == 404, (method, path, response.text)
    assert (await gateway.client.get("/api/servers", headers=gateway.bearer(other))).json() == []
    assert (await gateway.client.get("/api/instances", headers=gateway.bearer(other))).json() == []


async def test_plan_limits_refuse_beyond_the_plan(gateway: Gateway) -> None:
    session = await gateway.register()
    too_big = await gateway.client.post("/api/instances", headers=gateway.bearer(session), json={
        "kind": "game", "name": "big", "engineType": "minecraft", "payload": {"cores": 32}})
    assert too_big.status_code == 403
    assert too_big.json()["details"]["limit"] == "cores"
    await gateway.provision(session, "game", "one")
    second = await gateway.client.post("/api/instances", headers=gateway.bearer(session), json={
        "kind": "game", "name": "two", "engineType": "minecraft"})
    assert second.status_code == 403
    assert second.json() == {"error": "PLAN_LIMIT", "details": {
        "limit": "max_game_servers", "allowed": 1, "current": 1, "plan": "free"}}


async def test_invalid_instance_requests_are_4xx(gateway: Gateway) -> None:
    session = await gateway.register()
    for body in ({"kind": "vm", "name": "x", "engineType": "minecraft"},
                 {"kind": "game", "name": "", "engineType": "minecraft"},
                 {"kind": "game", "name": "x", "engineType": "minecraft", "payload": {"cores": "2"}},
                 {"kind": "game", "name": "x", "engineType": "minecraft", "payload": {"ports": [70000]}}):
        response = await gateway.client.post("/api/instances", headers=gateway.bearer(session), json=body)
        assert response.status_code == 422, (body, response.text)
    assert (await gateway.client.get("/api/instances", headers=gateway.bearer(session))).json() == []


async def test_a_delete_recorded_elsewhere_mid_provisioning_is_never_overwritten(gateway: Gateway) -> None:
    """Another replica's DELETE lands while this one provisions: every later provisioning step is a
    compare-and-set on the state it read, so the row stays DELETING instead of moving on to READY."""
    session = await gateway.register()
    response = await gateway.client.post("/api/instances", headers=gateway.bearer(session), json={
        "kind": "game", "name": "raced", "engineType": "minecraft", "payload": {}})
    assert response.status_code == 202, response.text
    sid = response.json()["id"]
    db = connect_database(gateway.settings.database_url)

    def state() -> str:
        with db.connection_context(), db.bind_ctx([store_instances.Instance]):
            return store_instances.Instance.get_by_id(sid).state

    def delete_elsewhere(expected: str) -> bool:
        with db.connection_context(), db.bind_ctx([store_instances.Instance]):
            return store_instances.move_instance(sid, expected, state="deleting")

    with trio.fail_after(30):
        while True:  # catch it between two provisioning steps (the CAS fails if a step lands first)
            seen = await trio.to_thread.run_sync(state)
            assert seen in ("reserved", "creating", "configuring", "awaiting_ready"), (
                f"provisioning got to {seen} before the race")
            if seen in ("configuring", "awaiting_ready") and await trio.to_thread.run_sync(delete_elsewhere, seen):
                break
            await trio.sleep(0.005)
    await trio.sleep(3)  # the agent becomes ready meanwhile; its provisioning steps must all lose
    assert await trio.to_thread.run_sync(state) == "deleting"
