"""Backups and mods through the gateway: agent status kept, bodies passed through, restore async."""

from __future__ import annotations

import trio

from tests.conftest import Gateway


async def test_backup_create_restore_delete(gateway: Gateway) -> None:
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "bk")
    auth = gateway.bearer(session)
    files = f"/api/servers/{instance['id']}/files"
    base = f"/api/game/servers/{instance['id']}/backups"
    await gateway.client.put(f"{files}/content", json={"path": "world.txt", "content": "v1"}, headers=auth)
    created = await gateway.client.post(base, json={"name": "first"}, headers=auth)
    assert created.status_code == 201, created.text
    backup_id = created.json()["backup"]["id"]
    listed = await gateway.client.get(base, headers=auth)
    assert [b["id"] for b in listed.json()["backups"]] == [backup_id]
    download = await gateway.client.get(f"{base}/{backup_id}/download", headers=auth)
    assert download.status_code == 200 and download.content[:2] == b"\x1f\x8b"  # gzip
    await gateway.client.put(f"{files}/content", json={"path": "world.txt", "content": "v2"}, headers=auth)

    with trio.fail_after(5):
        restore = await gateway.client.post(f"{base}/restore", params={"id": backup_id}, headers=auth)
    assert restore.status_code == 202, restore.text
    # The restore is still running when the POST has answered: the Portal polls status.
    busy = await gateway.client.post(base, json={"name": "during"}, headers=auth)
    assert busy.status_code == 409 and busy.json()["error"] == "OPERATION_IN_PROGRESS"
    await gateway.wait_for(lambda b: any(op.get("kind") == "restore" for op in b["operations"]),
                           f"/api/servers/{instance['id']}", session)
    with trio.fail_after(20):
        while True:
            content = await gateway.client.get(f"{files}/content", params={"path": "world.txt"}, headers=auth)
            if content.status_code == 200 and content.json()["content"] == "v1":
                break
            await trio.sleep(0.1)
    missing = await gateway.client.post(f"{base}/restore", params={"id": "nope"}, headers=auth)
    assert missing.status_code == 404 and set(missing.json()) == {"error", "details"}
    with trio.fail_after(20):
        while True:
            deleted = await gateway.client.delete(f"{base}/{backup_id}", headers=auth)
            if deleted.status_code != 409:
                break
            await trio.sleep(0.1)
    assert deleted.status_code == 200
    assert (await gateway.client.get(base, headers=auth)).json()["backups"] == []


async def test_mods_are_forwarded(gateway: Gateway) -> None:
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "mods")
    auth = gateway.bearer(session)
    base = f"/api/game/servers/{instance['id']}/mods"
    assert (await gateway.client.post(base, json={"id": "worldedit", "version": "7.3"}, headers=auth)).status_code == 201
    assert (await gateway.client.post(base, json={"id": "worldedit"}, headers=auth)).status_code == 409
    assert (await gateway.client.post(f"{base}/worldedit/disable", headers=auth)).status_code == 200
    mods = (await gateway.client.get(base, headers=auth)).json()["mods"]
    assert mods[0]["id"] == "worldedit" and mods[0]["enabled"] is False
    assert (await gateway.client.delete(f"{base}/worldedit", headers=auth)).status_code == 200
    assert (await gateway.client.get(base, headers=auth)).json()["mods"] == []
