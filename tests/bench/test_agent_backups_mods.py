"""The reference agent's backups (create, restore in the background, one at a time) and mods."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from agent_harness import running_agent


@pytest.mark.trio
async def test_restore_returns_before_it_finishes_and_brings_files_back(tmp_path: Path) -> None:
    async with running_agent(tmp_path, restore_min_seconds=0.5) as agent:
        await agent.client.put("/files/content", json={"path": "world/level.dat", "content": "v1"})
        created = await agent.client.post("/backups", json={"name": "before-update"})
        assert created.status_code == 201
        backup = created.json()["backup"]
        assert backup["name"] == "before-update" and backup["size"] > 0
        assert backup["createdAt"].endswith("Z")
        listed = (await agent.client.get("/backups")).json()["backups"]
        assert [item["id"] for item in listed] == [backup["id"]]

        await agent.client.put("/files/content", json={"path": "world/level.dat", "content": "v2"})
        await agent.client.put("/files/content", json={"path": "stray.txt", "content": "new"})
        restore = await agent.client.post("/backups/restore", params={"id": backup["id"]})
        assert restore.status_code == 202
        operation = restore.json()["operation"]
        assert operation["kind"] == "restore" and operation["state"] == "running"

        status = (await agent.client.get("/status")).json()
        [running] = [op for op in status["operations"] if op["id"] == operation["id"]]
        assert running["state"] == "running" and 0 <= running["progress"] < 100
        busy = await agent.client.post("/backups")
        assert busy.status_code == 409
        assert busy.json()["error"] == "OPERATION_IN_PROGRESS"
        assert (await agent.client.post("/backups/restore",
                                        params={"id": backup["id"]})).status_code == 409
        assert (await agent.client.delete(f"/backups/{backup['id']}")).status_code == 409
        assert (await agent.client.get("/files/content", params={"path": "world/level.dat"})
                ).json()["content"] == "v2"

        status = await agent.wait_for(lambda s: s["operations"][-1]["state"] != "running")
        finished = status["operations"][-1]
        assert finished["state"] == "done" and finished["progress"] == 100
        assert finished["finishedAt"] is not None and finished["error"] is None
        assert (agent.files_dir / "world" / "level.dat").read_text() == "v1"
        assert not (agent.files_dir / "stray.txt").exists()


@pytest.mark.trio
async def test_backup_download_delete_and_unknown_ids(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        await agent.client.put("/files/content", json={"path": "a.txt", "content": "alpha"})
        backup = (await agent.client.post("/backups")).json()["backup"]
        download = await agent.client.get(f"/backups/{backup['id']}/download")
        assert download.status_code == 200
        assert int(download.headers["content-length"]) == backup["size"]
        with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as archive:
            assert archive.getnames() == ["a.txt"]
        assert (await agent.client.delete(f"/backups/{backup['id']}")).json() == {
            "deleted": backup["id"]}
        assert (await agent.client.get("/backups")).json() == {"backups": []}
        assert (await agent.client.delete(f"/backups/{backup['id']}")).status_code == 404
        assert (await agent.client.post("/backups/restore",
                                        params={"id": "000000000000"})).status_code == 404
        assert (await agent.client.get("/backups/../../etc/download")).status_code == 404


@pytest.mark.trio
async def test_mods_install_toggle_remove_and_persist(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        assert (await agent.client.get("/mods")).json() == {"mods": []}
        installed = await agent.client.post("/mods", json={"id": "worldedit", "version": "7.3"})
        assert installed.status_code == 201
        assert installed.json()["mod"] == {"id": "worldedit", "name": "worldedit",
                                           "version": "7.3", "enabled": True}
        assert (await agent.client.post("/mods", json={"id": "worldedit"})).status_code == 409
        assert (await agent.client.post("/mods", json={"id": "../x"})).status_code == 400
        disabled = await agent.client.post("/mods/worldedit/disable")
        assert disabled.json()["mod"]["enabled"] is False
        await agent.client.post("/mods", json={"id": "luckperms", "name": "LuckPerms"})
        assert (await agent.client.post("/mods/nope/enable")).status_code == 404
    async with running_agent(tmp_path) as again:
        mods = (await again.client.get("/mods")).json()["mods"]
        assert [(mod["id"], mod["enabled"]) for mod in mods] == [("worldedit", False),
                                                                ("luckperms", True)]
        assert (await again.client.post("/mods/worldedit/enable")).json()["mod"]["enabled"]
        assert (await again.client.delete("/mods/luckperms")).json() == {"deleted": "luckperms"}
        assert [mod["id"] for mod in (await again.client.get("/mods")).json()["mods"]] == [
            "worldedit"]
