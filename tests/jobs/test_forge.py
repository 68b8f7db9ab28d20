"""B's forge: a real loopback HTTP listener that records every request it gets. User B tries every
combination of `repository` and `vault_connection` (A's connection, the admin's, B's own pointing at
another origin, case and userinfo tricks) and every route that reaches a repository; no secret of A's
or the admin's ever reaches B's forge, or any forge before its owner's own call, or any answer B gets,
or any job's output. The same run shows an allowed CIDR making loopback forges usable, and that a
connection's secret does reach its own origin when its owner asks (so the recording can see one)."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import pytest
import trio

from control.jobs.sources import Credentials, SourceUnavailable, list_refs
from control.jobs.targets import Origin, Target
from tests.jobs.conftest import PROJECT_YAML, Jobs

SECRET_A = "secret-of-user-a-7f3e"
SECRET_ADMIN = "secret-of-the-admin-91c2"
SECRET_B = "secret-of-user-b-55aa"
THEIRS = (SECRET_A, SECRET_ADMIN)


@pytest.fixture
def settings(settings: Any) -> Any:
    settings.jobs_allowed_sources = ["127.0.0.0/8"]  # loopback forges, and nothing local
    return settings


@dataclass
class Forge:
    port: int
    requests: list[bytes] = field(default_factory=list)

    def url(self, path: str = "repo.git") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def seen(self) -> str:
        """Everything received, with Basic credentials decoded, as one text to search."""
        text = b"\n".join(self.requests).decode("latin-1")
        decoded = [base64.b64decode(token + "==").decode("latin-1")
                   for token in re.findall(r"(?i)basic ([A-Za-z0-9+/=]+)", text)]
        return text + "\n" + "\n".join(decoded)


async def _forge(nursery: trio.Nursery, redirect_to: str | None = None) -> Forge:
    """A recording listener answering 404, or a redirect to `redirect_to`."""
    forge = Forge(0)

    async def serve(stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        raw = b""
        with trio.move_on_after(5):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    raw += data
                    connection.receive_data(data)
                    continue
                if isinstance(event, h11.Request | h11.Data):
                    continue
                break
            forge.requests.append(raw)
            headers = [("content-length", "0"), ("connection", "close")]
            if redirect_to is not None:
                headers.append(("location", redirect_to))
            reply = connection.send(h11.Response(status_code=302 if redirect_to else 404, headers=headers))
            await stream.send_all(reply + connection.send(h11.EndOfMessage()))
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    forge.port = listeners[0].socket.getsockname()[1]
    return forge


def _yaml(name: str, repository: str | None, connection: str | None) -> str:
    extra = "".join(f"\n  {key}: '{value}'" for key, value in (("repository", repository),
                                                               ("vault_connection", connection)) if value)
    return PROJECT_YAML.replace("name: demo", f"name: {name}").replace("  default_ref: main",
                                                                        "  default_ref: main" + extra)


async def _connection(jobs: Jobs, who: dict[str, str], name: str, url: str, secret: str,
                      username: str | None = None) -> None:
    response = await jobs.client.post("/api/v1/vault/connections", headers=who, json={
        "name": name, "kind": "git", "url": url, "secret": secret, "username": username})
    assert response.status_code == 201, response.text
    assert secret not in response.text


async def _reach_repository(jobs: Jobs, who: dict[str, str], project: dict[str, Any]) -> list[str]:
    """Every route that makes the gateway call a project's repository; the answers' texts."""
    pipeline, chain = project["pipelines"][0]["id"], project["chains"][0]["id"]
    texts = []
    for path in (f"/api/v1/pipelines/{pipeline}/source-refs", f"/api/v1/pipeline-chains/{chain}/source-refs"):
        texts.append((await jobs.client.get(path, headers=who)).text)
    async with jobs.client.stream("GET", f"/api/v1/pipelines/{pipeline}/version-resolve", headers=who) as stream:
        texts.append((await stream.aread()).decode())
    texts.append((await jobs.client.post(f"/api/v1/projects/{project['id']}/reload", headers=who)).text)
    return texts


async def test_no_secret_of_a_or_the_admin_ever_reaches_bs_forge(jobs: Jobs, nursery: trio.Nursery) -> None:
    forge_a, forge_admin, forge_b = await _forge(nursery), await _forge(nursery), await _forge(nursery)
    b = jobs.gateway.bearer(await jobs.gateway.register("b@example.com"))
    await _connection(jobs, jobs.operator, "a-creds", forge_a.url("a/repo.git"), SECRET_A)
    await _connection(jobs, jobs.admin, "admin-creds", forge_admin.url("admin/repo.git"), SECRET_ADMIN, "deploy")
    await _connection(jobs, b, "b-creds", forge_b.url("b/repo.git"), SECRET_B)
    await _connection(jobs, b, "b-at-a", forge_a.url("a/repo.git"), SECRET_B)  # B's own, on A's origin
    runner = await jobs.register_runner("shared-box")

    repositories = [forge_b.url("b/repo.git"), forge_a.url("a/repo.git"), forge_admin.url("admin/repo.git"),
                    forge_a.url("a/repo.git").upper().replace("/A/REPO.GIT", "/a/repo.git"),
                    f"http://127.0.0.1:{forge_admin.port}@127.0.0.1:{forge_b.port}/x.git",
                    f"http://127.0.0.1:{forge_b.port}/redirect?to=http://127.0.0.1:{forge_admin.port}/"]
    answers: list[str] = []
    imported = 0
    for index, (repository, name) in enumerate((r, c) for r in repositories
                                               for c in ("a-creds", "admin-creds", "b-creds", "b-at-a", None)):
        response = await jobs.client.post("/api/v1/projects/import", headers=b,
                                          json={"yaml": _yaml(f"b-{index}", repository, name)})
        answers.append(response.text)
        if name in ("a-creds", "admin-creds") and response.status_code != 400:  # 400: the repository itself
            assert response.status_code == 422, response.text  # the same answer as a name that does not exist
            assert response.json()["details"][0]["field"] == "project.vault_connection"
        if response.status_code != 201:
            assert response.status_code in (400, 422), response.text
            continue
        imported += 1
        project = response.json()
        answers += await _reach_repository(jobs, b, project)
        queued = await jobs.client.post(f"/api/v1/pipelines/{project['pipelines'][0]['id']}/run-selection",
                                        json={}, headers=b)
        answers.append(queued.text)
        lease = await runner.lease()
        answers.append(json.dumps(lease))
        await runner.status(lease["job"]["id"], "done", exit_code=0)
        answers.append((await jobs.client.get(f"/api/v1/jobs/{lease['job']['id']}", headers=b)).text)
    assert imported >= 4  # B's own forge with and without B's connection, A's and the admin's forge without
    for connection in (await jobs.client.get("/api/v1/vault/connections", headers=b)).json()["connections"]:
        answers.append((await jobs.client.post(f"/api/v1/vault/connections/{connection['id']}/test",
                                               headers=b)).text)
    answers.append((await jobs.client.get("/api/v1/jobs", headers=b)).text)

    assert forge_b.requests, "B's forge was reached, so the gateway did call it"
    for forge in (forge_a, forge_admin, forge_b):
        for secret in THEIRS:
            assert secret not in forge.seen(), (forge.port, secret)
    assert SECRET_B in forge_b.seen()  # B's own secret goes to B's own origin, which the recording sees
    for text in answers:
        for secret in (*THEIRS, SECRET_B):
            assert secret not in text

    # The owners' own calls: each secret reaches exactly its own connection's origin.
    a_project = (await jobs.client.post("/api/v1/projects/import", headers=jobs.operator, json={
        "yaml": _yaml("a-project", forge_a.url("a/repo.git"), "a-creds")})).json()
    answers_a = await _reach_repository(jobs, jobs.operator, a_project)
    admin_project = (await jobs.client.post("/api/v1/projects/import", headers=jobs.admin, json={
        "yaml": _yaml("admin-project", forge_admin.url("admin/repo.git"), "admin-creds")})).json()
    answers_admin = await _reach_repository(jobs, jobs.admin, admin_project)
    assert SECRET_A in forge_a.seen() and SECRET_ADMIN in forge_admin.seen()
    assert SECRET_A not in forge_b.seen() and SECRET_ADMIN not in forge_b.seen()
    assert not any(s in text for s in THEIRS for text in answers_a + answers_admin)


async def test_a_connection_for_another_origin_is_refused_at_import(jobs: Jobs, nursery: trio.Nursery) -> None:
    mine, other = await _forge(nursery), await _forge(nursery)
    await _connection(jobs, jobs.operator, "mine", mine.url(), SECRET_A)
    response = await jobs.client.post("/api/v1/projects/import", headers=jobs.operator,
                                      json={"yaml": _yaml("p", other.url(), "mine")})
    assert response.status_code == 400 and response.json()["error"] == "SOURCE_REFUSED"
    assert response.json()["details"][0]["field"] == "project.repository" and SECRET_A not in response.text
    # An admin's project may not use a regular user's connection either.
    admins = await jobs.client.post("/api/v1/projects/import", headers=jobs.admin,
                                    json={"yaml": _yaml("q", mine.url(), "mine")})
    assert admins.status_code == 422 and admins.json()["details"][0]["field"] == "project.vault_connection"
    assert mine.requests == [] and other.requests == []


async def test_git_connects_to_the_checked_addresses_and_follows_no_redirect(nursery: trio.Nursery) -> None:
    elsewhere = await _forge(nursery)
    forge = await _forge(nursery, redirect_to=elsewhere.url("stolen.git/info/refs?service=git-upload-pack"))
    # A name that resolves nowhere: git reaches the forge only through the addresses the check pinned.
    target = Target(f"http://forge.invalid:{forge.port}/repo.git", Origin("http", "forge.invalid", forge.port),
                    ("127.0.0.1",))
    with pytest.raises(SourceUnavailable):
        await list_refs(target, Credentials(None, SECRET_A), 10.0)
    assert len(forge.requests) == 1 and b"host: forge.invalid" in forge.requests[0].lower()
    assert SECRET_A in forge.seen()  # its own origin
    assert elsewhere.requests == []  # the redirect was not followed, with or without the secret
