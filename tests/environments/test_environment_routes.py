"""Every route of the environments API on the real gateway, without containers: authentication,
validation over the wire, paging, ownership, the status rules of start/stop, activity and delete.
(Environments that need a container are in test_environment_lifecycle.py.)"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

import pytest
import trio

from control.app import run_gateway
from control.config import Settings
from control.environments import BASE
from storage import environments as store_env
from storage import instances as store_instances
from storage import users
from storage.clock import utcnow
from storage.db import Store, connect_database
from storage.migrations import migrate
from storage.models import User
from tests.conftest import Gateway
from tests.environments.conftest import GOOD, Environments, in_db, seed_error


async def seeded(owner: dict, status: str = "STOPPED", name: str = "seeded", **fields: Any) -> str:
    """An environment row with no container behind it (what these tests need of one)."""
    count = await in_db(lambda: store_env.Environment.select().count())
    environment_id = f"env-seed{count:04d}"
    created = utcnow() + timedelta(milliseconds=count)
    await in_db(lambda: store_env.create_environment(
        id=environment_id, owner=owner["user"]["id"], name=name, cloud_provider="AWS",
        cloud_region="us-east-1", cpu_cores=2, memory_gb=4, storage_gb=20, base_image="node", status=status,
        created_at=created, running_since=created if status == "RUNNING" else None,
        **{"instance_id": None, **fields}))
    return environment_id


@pytest.mark.parametrize(("method", "path"), [
    ("POST", BASE), ("GET", BASE), ("GET", f"{BASE}/env-x"), ("POST", f"{BASE}/env-x/start"),
    ("POST", f"{BASE}/env-x/stop"), ("POST", f"{BASE}/env-x/activity"), ("DELETE", f"{BASE}/env-x")])
async def test_every_route_needs_an_access_token(envs: Environments, method: str, path: str) -> None:
    for headers in ({}, {"authorization": "Bearer not-a-token"}, {"authorization": "Basic dXNlcjpwYXNz"}):
        response = await envs.client.request(method, path, headers=headers, json=GOOD)
        seed_error(response, 401, "UNAUTHORIZED")
        assert response.headers["www-authenticate"] == "Bearer"


async def test_refresh_token_is_not_an_access_token(envs: Environments) -> None:
    session = await envs.gateway.register()
    response = await envs.client.get(BASE, headers={"authorization": f"Bearer {session['refreshToken']}"})
    seed_error(response, 401, "UNAUTHORIZED")


@pytest.mark.parametrize(("fields", "message"), [
    ({"cpuCores": 0}, "cpuCores must be between 1 and 4"),
    ({"cpuCores": 5}, "cpuCores must be between 1 and 4"),
    ({"memoryGB": 0}, "memoryGB must be between 1 and 16"),
    ({"memoryGB": 17}, "memoryGB must be between 1 and 16"),
    ({"storageGB": 9}, "storageGB must be between 10 and 100"),
    ({"storageGB": 101}, "storageGB must be between 10 and 100"),
    ({"cloudProvider": "azure"}, "cloudProvider must be one of AZURE, AWS, GCP"),
    ({"name": None}, "name is required"),
    ({"cpuCores": "2"}, "cpuCores must be an integer"),
])
async def test_create_validation_over_the_wire(envs: Environments, fields: dict, message: str) -> None:
    session = await envs.gateway.register()
    assert seed_error(await envs.create(session, **fields), 400, "INVALID_REQUEST") == message
    assert (await envs.client.get(BASE, headers=envs.auth(session))).json()["total"] == 0


async def test_create_body_must_be_json(envs: Environments) -> None:
    session = await envs.gateway.register()
    headers = envs.auth(session)
    bad = await envs.client.post(BASE, content=b"{nope", headers={**headers, "content-type": "application/json"})
    assert seed_error(bad, 400, "INVALID_REQUEST") == "request body is not valid JSON"
    form = await envs.client.post(BASE, content=b"name=x", headers={**headers, "content-type": "text/plain"})
    assert seed_error(form, 400, "INVALID_REQUEST") == "Content-Type must be application/json"
    empty = await envs.client.post(BASE, content=b"", headers={**headers, "content-type": "application/json"})
    assert seed_error(empty, 400, "INVALID_REQUEST") == "request body must be a JSON object"


async def test_plan_limits_answer_400_in_the_seeds_terms(envs: Environments) -> None:
    session = await envs.gateway.register()  # the free plan: 2 cores, 4 GiB, 20 GB, one dev container
    for fields, message in (({"cpuCores": 4}, "plan 'free' allows at most 2 cpuCores (requested 4)"),
                            ({"memoryGB": 16}, "plan 'free' allows at most 4 memoryGB (requested 16)"),
                            ({"storageGB": 100}, "plan 'free' allows at most 20 storageGB (requested 100)")):
        assert seed_error(await envs.create(session, **fields), 400, "INVALID_REQUEST") == message


async def test_unknown_environment_is_404(envs: Environments) -> None:
    session = await envs.gateway.register()
    for response in (await envs.get(session, "env-nope"), await envs.action(session, "env-nope", "start"),
                     await envs.action(session, "env-nope", "stop"), await envs.delete(session, "env-nope"),
                     await envs.action(session, "env-nope", "activity",
                                       json={"snapshot": {}, "timestamp": "2025-10-24T11:00:00Z"})):
        assert seed_error(response, 404, "NOT_FOUND") == "environment with ID 'env-nope' not found"


async def test_list_pages_own_environments_oldest_first(envs: Environments) -> None:
    owner = await envs.gateway.register("owner@example.com")
    other = await envs.gateway.register("other@example.com")
    mine = [await seeded(owner, name=f"mine-{i}") for i in range(5)]
    theirs = await seeded(other, name="theirs")
    headers = envs.auth(owner)
    first = (await envs.client.get(BASE, headers=headers)).json()
    assert (first["total"], first["page"], first["pageSize"]) == (5, 1, 20)
    assert [e["id"] for e in first["environments"]] == mine
    pages = [(await envs.client.get(BASE, params={"page": p, "pageSize": 2}, headers=headers)).json()
             for p in (1, 2, 3, 4)]
    assert [[e["id"] for e in page["environments"]] for page in pages] == [mine[0:2], mine[2:4], mine[4:], []]
    assert all(page["total"] == 5 and page["pageSize"] == 2 for page in pages)
    listed = first["environments"][0]
    assert listed["userId"] == str(owner["user"]["id"]) and listed["status"] == "STOPPED"
    assert listed["cloudProvider"] == "AWS" and listed["autoStopAt"] is None
    assert theirs not in str((await envs.client.get(BASE, headers=headers)).json())
    bad = await envs.client.get(BASE, params={"pageSize": 0}, headers=headers)
    assert seed_error(bad, 400, "INVALID_REQUEST") == "pageSize must be between 1 and 100"


async def test_another_users_environment_looks_absent(envs: Environments) -> None:
    owner = await envs.gateway.register("owner@example.com")
    intruder = await envs.gateway.register("intruder@example.com")
    environment_id = await seeded(owner, status="RUNNING")
    for response in (await envs.get(intruder, environment_id), await envs.action(intruder, environment_id, "stop"),
                     await envs.action(intruder, environment_id, "start"), await envs.delete(intruder, environment_id),
                     await envs.action(intruder, environment_id, "activity",
                                       json={"snapshot": {"activeIDEConnections": 1},
                                             "timestamp": "2025-10-24T11:00:00Z"})):
        seed_error(response, 404, "NOT_FOUND")
    still = (await envs.get(owner, environment_id)).json()["environment"]
    assert still["status"] == "RUNNING" and still["lastAccessedAt"] == still["createdAt"]


async def test_admin_may_act_on_any_environment(envs: Environments) -> None:
    owner = await envs.gateway.register("owner@example.com")
    admin = await envs.gateway.register("admin@example.com")
    await in_db(lambda: User.update(role="admin").where(User.id == admin["user"]["id"]).execute())
    admin = (await envs.client.post("/api/auth/login", json={"email": "admin@example.com",
                                                              "password": "password123"})).json()
    environment_id = await seeded(owner)
    assert (await envs.get(admin, environment_id)).status_code == 200
    assert (await envs.client.get(BASE, headers=envs.auth(admin))).json()["total"] == 0  # "for the current user"


async def test_start_running_and_stop_stopped_are_400(envs: Environments) -> None:
    session = await envs.gateway.register()
    running = await seeded(session, status="RUNNING")
    stopped = await seeded(session, status="STOPPED")
    creating = await seeded(session, status="CREATING")
    assert "while it is RUNNING" in seed_error(await envs.action(session, running, "start"), 400, "INVALID_REQUEST")
    assert "while it is STOPPED" in seed_error(await envs.action(session, stopped, "stop"), 400, "INVALID_REQUEST")
    seed_error(await envs.action(session, creating, "start"), 400, "INVALID_REQUEST")
    seed_error(await envs.action(session, creating, "stop"), 400, "INVALID_REQUEST")
    errored = await seeded(session, status="ERROR")  # no container behind it: nothing to start
    assert "no dev container" in seed_error(await envs.action(session, errored, "start"), 400, "INVALID_REQUEST")
    for environment_id, status in ((running, "RUNNING"), (stopped, "STOPPED"), (errored, "ERROR")):
        assert (await envs.get(session, environment_id)).json()["environment"]["status"] == status


async def test_activity_is_recorded_and_moves_auto_stop(envs: Environments) -> None:
    session = await envs.gateway.register()
    environment_id = await seeded(session, status="RUNNING")
    before = (await envs.get(session, environment_id)).json()["environment"]
    assert before["autoStopAt"] is not None
    ide_at = (utcnow() + timedelta(seconds=5)).isoformat(timespec="milliseconds") + "Z"  # a container clock ahead
    body = {"snapshot": {"lastIDEActivity": ide_at, "lastSSHActivity": "2025-10-24T10:55:00Z",
                         "activeIDEConnections": 1, "activeSSHConnections": 0},
            "timestamp": "2025-10-24T11:00:00Z"}
    response = await envs.action(session, environment_id, "activity", json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Activity recorded", "environmentId": environment_id,
                               "snapshot": {**body["snapshot"], "lastSSHActivity": "2025-10-24T10:55:00.000Z"},
                               "timestamp": "2025-10-24T11:00:00.000Z"}
    after = (await envs.get(session, environment_id)).json()["environment"]
    assert after["lastAccessedAt"] > before["lastAccessedAt"]
    assert after["autoStopAt"] > before["autoStopAt"]
    bad = await envs.action(session, environment_id, "activity", json={"snapshot": {"activeIDEConnections": -2},
                                                                       "timestamp": "2025-10-24T11:00:00Z"})
    assert seed_error(bad, 400, "INVALID_REQUEST") == "snapshot.activeIDEConnections must be a non-negative integer"
    missing = await envs.action(session, environment_id, "activity", json={"timestamp": "2025-10-24T11:00:00Z"})
    assert seed_error(missing, 400, "INVALID_REQUEST") == "snapshot is required"


async def test_delete_environment_without_container(envs: Environments) -> None:
    session = await envs.gateway.register()
    environment_id = await seeded(session, status="ERROR")
    response = await envs.delete(session, environment_id)
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Environment deleted successfully", "id": environment_id}
    seed_error(await envs.get(session, environment_id), 404, "NOT_FOUND")
    seed_error(await envs.delete(session, environment_id), 404, "NOT_FOUND")


async def test_other_routes_keep_the_gateway_envelope(gateway: Gateway) -> None:
    response = await gateway.client.get("/api/me")
    assert response.status_code == 401 and set(response.json()) == {"error", "details"}


async def test_ops_bodies_merge_the_seeds(gateway: Gateway) -> None:
    health = (await gateway.client.get("/health")).json()
    assert health["status"] == "ok" and health["service"] == "zlh-gateway"
    assert health["uptime"].endswith("s") and health["version"]
    ready = await gateway.client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["ready"] is True
    assert (await gateway.client.get("/live")).json() == {"status": "alive"}
    root = (await gateway.client.get("/")).json()
    assert root["service"] == "zlh-gateway" and root["status"] == "running"
    assert root["endpoints"]["health"] == "/health" and root["endpoints"]["api"] == "/api/v1"
    document = (await gateway.client.get("/openapi.json")).json()
    assert {"post", "get"} <= set(document["paths"][BASE])
    assert "delete" in document["paths"][BASE + "/{environment_id}"]


async def seeded_with_container_row(owner: dict, status: str) -> tuple[str, int]:
    """An environment whose instance row says ready, with no container behind it on the provider."""
    def create() -> int:
        instance = store_instances.create_instance(
            vmid=store_instances.next_free_vmid(), owner=owner["user"]["id"], kind="dev", name="ghost",
            engine_type="vscode", payload={}, allocated_ports=[], provider="local", agent_secret="s" * 32,
            agent_host="127.0.0.1", agent_port=9, ide_port=9, state="ready")
        return int(instance.id)

    instance_id = await in_db(create)
    return await seeded(owner, status=status, instance_id=instance_id), instance_id


async def test_failed_start_is_environment_error_with_reason(envs: Environments) -> None:
    session = await envs.gateway.register()
    environment_id, _instance = await seeded_with_container_row(session, "STOPPED")
    message = seed_error(await envs.action(session, environment_id, "start"), 500, "ENVIRONMENT_ERROR")
    assert "does not exist" in message
    now = (await envs.get(session, environment_id)).json()["environment"]
    assert now["status"] == "ERROR" and now["statusReason"] == f"start failed: {message}"


async def test_unexpected_failure_is_service_error(envs: Environments, monkeypatch: pytest.MonkeyPatch) -> None:
    session = await envs.gateway.register()

    def broken(*args: Any) -> None:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(store_env, "environment_page", broken)
    response = await envs.client.get(BASE, headers=envs.auth(session))
    assert seed_error(response, 500, "SERVICE_ERROR") == "internal service error"
    assert "fire" not in response.text


async def test_interrupted_operations_resume_at_start_up(nursery: trio.Nursery, settings: Settings,
                                                         database_url: str) -> None:
    store = Store(connect_database(database_url))
    await trio.to_thread.run_sync(migrate, store.db)

    def seed() -> int:
        owner = users.create_user("resume@example.com", "x")
        for environment_id, status in (("env-was-deleting", "DELETING"), ("env-was-stopping", "STOPPING")):
            store_env.create_environment(id=environment_id, owner=owner.id, instance_id=None, name=environment_id,
                                         cloud_provider="GCP", cloud_region="europe-west1", cpu_cores=2, memory_gb=4,
                                         storage_gb=20, base_image="node", status=status)
        return int(owner.id)

    await store.run(seed)
    store.close()
    shutdown = trio.Event()
    await nursery.start(functools.partial(run_gateway, settings, shutdown))

    def statuses() -> dict[str, tuple[str, str | None]]:
        return {e.id: (e.status, e.status_reason) for e in store_env.Environment.select()}

    with trio.fail_after(10):
        while await in_db(statuses) != {"env-was-stopping": ("ERROR", "stop failed: the dev container is gone")}:
            await trio.sleep(0.05)
    shutdown.set()
