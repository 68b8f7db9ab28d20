"""Environments backed by real dev containers of the local provider (each one a reference agent
process), through the real gateway on real sockets: create → RUNNING → the IDE opens through the
gateway → stop → start → delete; workspace secrets delivered and never echoed or logged; idle
auto-stop under a fake clock; the top of every range accepted on a plan that allows it."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import trio

from control.config import Settings
from storage import clock
from storage.environments import Environment
from storage.models import User
from tests.environments.conftest import BASE, Environments, in_db, seed_error

SECRETS = {"githubToken": "ghp_Zq7secretGitHubToken", "gitUserName": "Ada Lovelace", "gitUserEmail": "ada@example.com",
           "sshPublicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISecretKeyMaterial ada@host",
           "codeServerPassword": "secret-password-123", "anthropicApiKey": "sk-ant-SecretAnthropic",
           "openaiApiKey": "sk-proj-SecretOpenAI", "geminiApiKey": "AIzaSecretGemini"}
SECRET_VALUES = [v for k, v in SECRETS.items() if k not in ("gitUserName", "gitUserEmail")]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.environment_idle_check_interval = 0.1  # rounds run; only a moved clock makes anything idle
    return settings


def assert_no_secret(text: str) -> None:
    for value in SECRET_VALUES:
        assert value not in text


async def ide_status(envs: Environments, url: str, cookie: str) -> int:
    return (await envs.client.get(url, headers={"cookie": cookie})).status_code


async def test_environment_lifecycle_end_to_end(envs: Environments, settings: Settings,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    session = await envs.gateway.register()
    created = await envs.create(session, **SECRETS)
    assert created.status_code == 201, created.text
    assert_no_secret(created.text)
    body = created.json()
    assert body["message"] == "Environment created successfully"
    environment = body["environment"]
    environment_id, instance_id = environment["id"], environment["instanceId"]
    assert environment["status"] == "CREATING" and environment["userId"] == str(session["user"]["id"])
    assert (environment["cpuCores"], environment["memoryGB"], environment["storageGB"]) == (2, 4, 20)
    assert environment["vsCodeUrl"] == f"/__ide/{instance_id}/"

    running = await envs.wait_status(session, environment_id, "RUNNING")
    assert running["statusReason"] is None and running["autoStopAt"] is not None

    # The IDE opens through the gateway: an IDE token for the dev container, traded for the cookie.
    token = (await envs.client.post(f"/api/dev/{instance_id}/ide-token", headers=envs.auth(session))).json()["token"]
    traded = await envs.client.get(f"{running['vsCodeUrl']}?token={token}")
    assert traded.status_code == 302, traded.text
    cookie = traded.headers["set-cookie"].split(";")[0]
    page = await envs.client.get(running["vsCodeUrl"], headers={"cookie": cookie})
    assert page.status_code == 200 and json.loads(page.content)["path"] == "/"

    # The workspace settings reached the container, and nothing else shows them.
    delivered = await envs.client.get(f"/api/servers/{instance_id}/files/content",
                                      params={"path": ".zlh/workspace.env"}, headers=envs.auth(session))
    assert delivered.status_code == 200, delivered.text
    content = delivered.json()["content"]
    assert f"export GITHUB_TOKEN={SECRETS['githubToken']}" in content
    assert f"export OPENAI_API_KEY={SECRETS['openaiApiKey']}" in content and "export CODE_SERVER_PASSWORD=" in content
    for response in (await envs.get(session, environment_id), await envs.client.get(BASE, headers=envs.auth(session)),
                     await envs.client.get("/api/instances", headers=envs.auth(session)),
                     await envs.client.get(f"/api/servers/{instance_id}", headers=envs.auth(session))):
        assert response.status_code == 200
        assert_no_secret(response.text)
    sealed = await in_db(lambda: Environment.get_by_id(environment_id).sealed_secrets)
    assert sealed and sealed.startswith("v1.")
    assert_no_secret(sealed)

    stopped = await envs.action(session, environment_id, "stop")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json() == {"message": "Environment stopped successfully", "id": environment_id}
    now = (await envs.get(session, environment_id)).json()["environment"]
    assert now["status"] == "STOPPED" and now["statusReason"] == "stopped by the user" and now["autoStopAt"] is None
    assert await ide_status(envs, running["vsCodeUrl"], cookie) != 200  # the container is down
    seed_error(await envs.action(session, environment_id, "stop"), 400, "INVALID_REQUEST")

    started = await envs.action(session, environment_id, "start")
    assert started.status_code == 200, started.text
    assert started.json() == {"message": "Environment started successfully", "id": environment_id}
    assert (await envs.get(session, environment_id)).json()["environment"]["status"] == "RUNNING"
    seed_error(await envs.action(session, environment_id, "start"), 400, "INVALID_REQUEST")
    with trio.fail_after(10):  # the IDE proxy may hold the old address for a moment
        while await ide_status(envs, running["vsCodeUrl"], cookie) != 200:
            await trio.sleep(0.2)

    vmid = (await envs.client.get("/api/instances", headers=envs.auth(session))).json()[0]["vmid"]
    container = Path(settings.data_dir) / "containers" / str(vmid)
    agent_log = (container / "agent.log").read_text()
    deleted = await envs.delete(session, environment_id)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"message": "Environment deleted successfully", "id": environment_id}
    seed_error(await envs.get(session, environment_id), 404, "NOT_FOUND")
    assert (await envs.client.get("/api/instances", headers=envs.auth(session))).json() == []
    assert not container.exists()
    assert_no_secret(caplog.text)
    assert_no_secret(agent_log)


async def test_idle_environment_is_stopped_with_its_reason(envs: Environments,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    session = await envs.gateway.register()
    created = await envs.create(session, cpuCores=1, memoryGB=1, storageGB=10)  # the bottom of every range
    assert created.status_code == 201, created.text
    environment_id = created.json()["environment"]["id"]
    running = await envs.wait_status(session, environment_id, "RUNNING")
    assert running["autoStopAt"] == clock.isoformat(clock_parse(running["lastAccessedAt"]) + timedelta(seconds=60))

    def advance(seconds: float) -> None:
        monkeypatch.setattr(clock, "offset", clock.offset + timedelta(seconds=seconds))

    advance(45)  # the supervisor reports an open SSH connection: that is activity now
    reported = await envs.action(session, environment_id, "activity", json={
        "snapshot": {"activeIDEConnections": 0, "activeSSHConnections": 1},
        "timestamp": clock.isoformat(clock.utcnow())})
    assert reported.status_code == 200, reported.text
    awake = (await envs.get(session, environment_id)).json()["environment"]
    assert awake["autoStopAt"] > running["autoStopAt"]
    advance(45)  # 90 s after it started running, 45 s after the report
    await trio.sleep(0.5)  # several idle rounds
    assert (await envs.get(session, environment_id)).json()["environment"]["status"] == "RUNNING"
    advance(30)
    stopped = await envs.wait_status(session, environment_id, "STOPPED", timeout=20)
    assert stopped["statusReason"].startswith("auto-stopped: idle for 1 min (no IDE or SSH connection")
    assert stopped["autoStopAt"] is None
    restarted = await envs.action(session, environment_id, "start")
    assert restarted.status_code == 200, restarted.text
    again = (await envs.get(session, environment_id)).json()["environment"]
    assert again["status"] == "RUNNING" and again["statusReason"] is None


def clock_parse(text: str) -> datetime:
    return datetime.fromisoformat(text.removesuffix("Z"))


async def test_top_of_every_range_on_a_plan_that_allows_it(envs: Environments) -> None:
    session = await envs.gateway.register()
    await in_db(lambda: User.update(plan="pro").where(User.id == session["user"]["id"]).execute())
    created = await envs.create(session, cpuCores=4, memoryGB=16, storageGB=100, cloudProvider="GCP")
    assert created.status_code == 201, created.text
    environment = created.json()["environment"]
    assert (environment["cpuCores"], environment["memoryGB"], environment["storageGB"]) == (4, 16, 100)
    instance = (await envs.client.get("/api/instances", headers=envs.auth(session))).json()[0]
    assert instance["payload"]["cores"] == 4 and instance["payload"]["memoryMb"] == 16 * 1024
    deleted = await envs.delete(session, environment["id"])  # while it is still being created
    assert deleted.status_code == 200, deleted.text
    seed_error(await envs.get(session, environment["id"]), 404, "NOT_FOUND")
    assert (await envs.client.get("/api/instances", headers=envs.auth(session))).json() == []
