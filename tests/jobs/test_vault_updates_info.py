"""Vault connections (sealed at rest, never returned, tested for real), the gateway's own release
updates (check/tags/apply/rollback/status/restart, dry-run-safe), healthz, runtime-state, server-info,
and that every route of seed 003 is mounted."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

from control.jobs.sealing import SecretBox, SecretUnreadable
from storage.db import connect_database
from tests.jobs.conftest import Jobs

SECRET = "s3cret-token-value"


def test_sealed_secrets_open_only_with_their_key_and_row() -> None:
    box = SecretBox("k" * 40)
    sealed = box.seal(SECRET, "git-creds")
    assert SECRET not in sealed and box.open(sealed, "git-creds") == SECRET
    with pytest.raises(SecretUnreadable):
        box.open(sealed, "another-row")
    with pytest.raises(SecretUnreadable):
        SecretBox("q" * 40).open(sealed, "git-creds")
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(SecretUnreadable):
        box.open(tampered, "git-creds")


async def _basic_auth_server(nursery: trio.Nursery, expected: str) -> str:
    """A tiny HTTP endpoint that answers 200 only to the expected Authorization header."""

    async def serve(stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        with trio.move_on_after(5):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
                    continue
                break
            headers = dict(event.headers)
            status = 200 if headers.get(b"authorization", b"").decode() == expected else 401
            data = connection.send(h11.Response(status_code=status, headers=[("content-length", "0")]))
            await stream.send_all(data + connection.send(h11.EndOfMessage()))
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"


async def test_vault_connections_are_sealed_and_tested_for_real(jobs: Jobs, nursery: trio.Nursery,
                                                                tmp_path: Path) -> None:
    expected = "Basic " + base64.b64encode(f"deploy:{SECRET}".encode()).decode()
    url = await _basic_auth_server(nursery, expected)
    body = {"name": "artifact-store", "kind": "http", "url": url, "username": "deploy", "secret": SECRET}
    own = await jobs.client.post("/api/v1/vault/connections", json={**body, "name": "operators-own"},
                                 headers=jobs.operator)
    assert own.status_code == 201 and SECRET not in own.text
    created = await jobs.client.post("/api/v1/vault/connections", json=body, headers=jobs.admin)
    assert created.status_code == 201, created.text
    assert SECRET not in created.text and created.json()["has_secret"] is True
    duplicate = await jobs.client.post("/api/v1/vault/connections", json=body, headers=jobs.admin)
    assert duplicate.status_code == 409

    def stored() -> list[str]:
        db = connect_database(jobs.gateway.settings.database_url)
        try:
            return [row[0] for row in db.execute_sql("SELECT sealed_secret FROM vault_connection")]
        finally:
            db.close()

    for sealed in await trio.to_thread.run_sync(stored):
        assert SECRET not in sealed and SECRET.encode() not in base64.urlsafe_b64decode(sealed[3:])

    tested = await jobs.client.post(f"/api/v1/vault/connections/{created.json()['id']}/test", headers=jobs.admin)
    assert tested.json()["ok"] is True and tested.json()["status"] == 200
    wrong = await jobs.client.post("/api/v1/vault/connections", headers=jobs.admin,
                                   json={**body, "name": "wrong", "secret": "not-it"})
    failing = await jobs.client.post(f"/api/v1/vault/connections/{wrong.json()['id']}/test", headers=jobs.admin)
    assert failing.json() == {"id": wrong.json()["id"], "ok": False, "error": "HTTP_401", "status": 401}

    repo = tmp_path / "repo"
    await trio.run_process(["git", "init", "-q", str(repo)])
    git = await jobs.client.post("/api/v1/vault/connections", headers=jobs.admin,
                                 json={"name": "git", "kind": "git", "url": str(repo), "secret": "token"})
    git_test = await jobs.client.post(f"/api/v1/vault/connections/{git.json()['id']}/test", headers=jobs.admin)
    assert git_test.json()["ok"] is True

    listing = await jobs.client.get("/api/v1/vault/connections", headers=jobs.admin)
    assert [c["name"] for c in listing.json()["connections"]] == ["artifact-store", "git", "operators-own", "wrong"]
    mine = await jobs.client.get("/api/v1/vault/connections", headers=jobs.operator)
    assert [c["name"] for c in mine.json()["connections"]] == ["operators-own"]
    assert SECRET not in listing.text and listing.json()["connections"][0]["last_test_ok"] is True
    gone = await jobs.client.delete(f"/api/v1/vault/connections/{wrong.json()['id']}", headers=jobs.admin)
    assert gone.status_code == 204
    assert (await jobs.client.post(f"/api/v1/vault/connections/{wrong.json()['id']}/test",
                                   headers=jobs.admin)).status_code == 404


def _publish(feed: Path, tag: str, files: dict[str, bytes], checksum: str | None = None) -> None:
    feed.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    archive = feed / f"{tag}.tar.gz"
    archive.write_bytes(buffer.getvalue())
    (feed / f"{tag}.tar.gz.sha256").write_text((checksum or hashlib.sha256(buffer.getvalue()).hexdigest()) + "\n")


async def test_update_apply_and_rollback_switch_the_release_links(jobs: Jobs) -> None:
    data = jobs.gateway.settings.data_dir
    feed, releases = data / "release-feed", data / "releases"
    _publish(feed, "v0.2.0", {"VERSION": b"0.2.0"})
    _publish(feed, "v0.3.0", {"VERSION": b"0.3.0"})
    post = jobs.client.post
    assert (await post("/api/v1/update/check", headers=jobs.operator)).status_code == 403

    check = (await post("/api/v1/update/check", headers=jobs.admin)).json()
    assert check["latest"] == "v0.3.0" and check["update_available"] is True
    tags = (await jobs.client.get("/api/v1/update/tags", headers=jobs.admin)).json()["tags"]
    assert [t["tag"] for t in tags] == ["v0.2.0", "v0.3.0"] and not any(t["staged"] for t in tags)

    preview = await post("/api/v1/update/apply", json={"tag": "v0.2.0", "dry_run": True}, headers=jobs.admin)
    assert preview.json()["dry_run"] is True and preview.json()["to"] == "v0.2.0"
    assert not (releases / "current").exists()  # a dry run changes nothing

    first = await post("/api/v1/update/apply", json={"tag": "v0.2.0"}, headers=jobs.admin)
    assert first.status_code == 200 and first.json()["pending_restart"] is True
    assert (releases / "current" / "VERSION").read_bytes() == b"0.2.0"
    second = await post("/api/v1/update/apply", json={}, headers=jobs.admin)  # the latest
    assert second.json()["from"] == "v0.2.0" and second.json()["to"] == "v0.3.0"
    assert (releases / "current" / "VERSION").read_bytes() == b"0.3.0"
    status = (await jobs.client.get("/api/v1/update/status", headers=jobs.admin)).json()
    assert (status["current"], status["previous"], status["staged"]) == ("v0.3.0", "v0.2.0", ["v0.2.0", "v0.3.0"])
    assert status["last_action"]["action"] == "apply"

    dry_back = await post("/api/v1/update/rollback", json={"dry_run": True}, headers=jobs.admin)
    assert dry_back.json()["to"] == "v0.2.0" and (releases / "current" / "VERSION").read_bytes() == b"0.3.0"
    back = await post("/api/v1/update/rollback", json={}, headers=jobs.admin)
    assert back.json()["to"] == "v0.2.0"
    assert (releases / "current" / "VERSION").read_bytes() == b"0.2.0"
    status = (await jobs.client.get("/api/v1/update/status", headers=jobs.admin)).json()
    assert (status["current"], status["previous"]) == ("v0.2.0", "v0.3.0")

    restart = await post("/api/v1/server/restart", json={"dry_run": True}, headers=jobs.admin)
    assert restart.status_code == 200 and restart.json()["dry_run"] is True and restart.json()["current"] == "v0.2.0"
    assert (await post("/api/v1/server/restart", json={"dry_run": True}, headers=jobs.operator)).status_code == 403


async def test_update_refuses_bad_archives(jobs: Jobs) -> None:
    feed = jobs.gateway.settings.data_dir / "release-feed"
    _publish(feed, "v1.0.0", {"VERSION": b"1"}, checksum="0" * 64)
    _publish(feed, "v1.1.0", {"../../escape": b"x"})
    mismatch = await jobs.client.post("/api/v1/update/apply", json={"tag": "v1.0.0"}, headers=jobs.admin)
    assert mismatch.status_code == 422 and mismatch.json()["error"] == "CHECKSUM_MISMATCH"
    escape = await jobs.client.post("/api/v1/update/apply", json={"tag": "v1.1.0"}, headers=jobs.admin)
    assert escape.status_code == 422 and escape.json()["error"] == "BAD_RELEASE_ARCHIVE"
    assert not (jobs.gateway.settings.data_dir / "escape").exists()
    missing = await jobs.client.post("/api/v1/update/apply", json={"tag": "v9.9.9"}, headers=jobs.admin)
    assert missing.status_code == 404
    no_previous = await jobs.client.post("/api/v1/update/rollback", json={}, headers=jobs.admin)
    assert no_previous.status_code == 409 and no_previous.json()["error"] == "NO_PREVIOUS_RELEASE"


async def test_healthz_runtime_state_and_server_info(jobs: Jobs) -> None:
    health = await jobs.client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "database": True}
    info = await jobs.client.get("/api/v1/server-info")
    assert info.status_code == 200 and info.json()["api_version"] == "v1"
    assert info.json()["database"] in ("sqlite", "postgresql")
    project = await jobs.import_project()
    runner = await jobs.register_runner()
    await jobs.run_pipeline(project["pipelines"][0]["id"])
    await jobs.run_pipeline(project["pipelines"][0]["id"])
    await runner.lease()
    state = await jobs.client.get("/api/v1/runtime-state", headers=jobs.operator)
    assert state.status_code == 200
    assert state.json()["jobs"]["queued"] == 1 and state.json()["jobs"]["leased"] == 1
    assert state.json()["agents"] == {"total": 1, "online": 1, "active": 1}
    assert "job-lease-reaper" in state.json()["services"]
    assert (await jobs.client.get("/api/v1/runtime-state")).status_code == 401


SEED_ROUTES = """
GET /api/v1/jobs/{id}; GET /api/v1/jobs/{id}/artifacts; GET /healthz; GET /api/v1/runtime-state;
POST /api/v1/heartbeat; POST /api/v1/agent/lease; POST /api/v1/jobs/{id}/status; POST /api/v1/jobs/{id}/artifacts;
POST /api/v1/jobs/{id}/tests; GET /api/v1/agents; GET /api/v1/agents/{agentId}; POST /api/v1/agents/{agentId}/actions;
GET /api/v1/projects; POST /api/v1/projects/import; GET /api/v1/projects/{projectId};
DELETE /api/v1/projects/{projectId}; GET /api/v1/projects/{projectId}/icon; POST /api/v1/projects/{projectId}/reload;
POST /api/v1/pipelines/{pipelineDbId}/run-selection; POST /api/v1/pipelines/{pipelineDbId}/dry-run-preview;
GET /api/v1/pipelines/{pipelineDbId}/source-refs; POST /api/v1/pipelines/{pipelineDbId}/eligible-agents;
POST /api/v1/pipeline-chains/{chainDbId}/run; POST /api/v1/pipeline-chains/{chainDbId}/dry-run-preview;
GET /api/v1/pipeline-chains/{chainDbId}/source-refs; POST /api/v1/pipeline-chains/{chainDbId}/eligible-agents;
GET /api/v1/pipelines/{pipelineDbId}/version-resolve; GET /api/v1/jobs; DELETE /api/v1/jobs/{id};
POST /api/v1/jobs/clear-queue; POST /api/v1/jobs/flush-history; POST /api/v1/jobs/{id}/cancel;
POST /api/v1/jobs/{id}/rerun; GET /api/v1/jobs/{id}/tests; GET /api/v1/vault/connections;
POST /api/v1/vault/connections; DELETE /api/v1/vault/connections/{id}; POST /api/v1/vault/connections/{id}/test;
POST /api/v1/update/check; POST /api/v1/update/apply; POST /api/v1/update/rollback; GET /api/v1/update/tags;
GET /api/v1/update/status; POST /api/v1/server/restart; GET /api/v1/server-info
"""


async def test_every_route_of_the_seed_is_in_the_openapi_document(jobs: Jobs) -> None:
    import re

    document = (await jobs.client.get("/openapi.json")).json()
    mounted = {(method.upper(), re.sub(r"\{\w+\}", "{}", path))
               for path, operations in document["paths"].items() for method in operations}
    wanted = [entry.strip().split(" ", 1) for entry in SEED_ROUTES.replace("\n", " ").split(";")]
    missing = [f"{m} {p}" for m, p in wanted if (m, re.sub(r"\{\w+\}", "{}", p)) not in mounted]
    assert len(wanted) == 45 and missing == []  # /healthz is listed twice
