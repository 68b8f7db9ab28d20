"""The rules of the environments API without a network: the seed's validation (every range edge),
the transition table, the idle rule, and the sealing of workspace settings."""

from __future__ import annotations

import shlex
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from control.config import Settings
from control.environments import (
    ENVIRONMENT_TRANSITIONS,
    EnvironmentApiError,
    EnvState,
    auto_stop_at,
    environment_json,
    last_activity,
    next_environment_state,
    open_settings,
    parse_activity,
    parse_create,
    parse_page,
    seal_settings,
    workspace_env_file,
)
from control.jobs.sealing import SecretBox, SecretUnreadable
from control.lifecycle import IllegalTransition
from control.ops import uptime_text
from storage.dev import IdeActivity
from storage.environments import Environment

GOOD: dict[str, Any] = {"name": "my-dev-environment", "cloudProvider": "AZURE", "cloudRegion": "eastus",
                        "baseImage": "node"}
T0 = datetime(2025, 10, 24, 10, 0, 0)


def rejected(data: Any, caller: int = 7) -> str:
    with pytest.raises(EnvironmentApiError) as caught:
        parse_create(data, caller)
    assert caught.value.status == 400 and caught.value.code == "INVALID_REQUEST"
    return caught.value.message


@pytest.mark.parametrize(("field", "low", "high"), [("cpuCores", 1, 4), ("memoryGB", 1, 16), ("storageGB", 10, 100)])
def test_every_resource_range_edge(field: str, low: int, high: int) -> None:
    for value in (low, high):
        assert getattr(parse_create({**GOOD, field: value}, 7), {"cpuCores": "cpu_cores", "memoryGB": "memory_gb",
                                                                "storageGB": "storage_gb"}[field]) == value
    for value in (0, low - 1, high + 1, -1):
        assert rejected({**GOOD, field: value}) == f"{field} must be between {low} and {high}"


def test_resources_default_from_the_seed_table() -> None:
    request = parse_create(GOOD, 7)
    assert (request.cpu_cores, request.memory_gb, request.storage_gb) == (2, 4, 20)
    assert parse_create({**GOOD, "cpuCores": None}, 7).cpu_cores == 2


@pytest.mark.parametrize("value", ["2", 2.0, 2.5, True, [2]])
def test_resources_must_be_integers(value: Any) -> None:
    assert rejected({**GOOD, "cpuCores": value}) == "cpuCores must be an integer"


@pytest.mark.parametrize("field", ["name", "cloudProvider", "cloudRegion", "baseImage"])
def test_required_fields(field: str) -> None:
    without = {k: v for k, v in GOOD.items() if k != field}
    assert rejected(without) == f"{field} is required"
    assert rejected({**GOOD, field: "  "}) == f"{field} is required"
    assert rejected({**GOOD, field: 5}) == f"{field} must be a string"


@pytest.mark.parametrize("provider", ["AZURE", "AWS", "GCP"])
def test_cloud_providers_accepted(provider: str) -> None:
    assert parse_create({**GOOD, "cloudProvider": provider}, 7).cloud_provider == provider


@pytest.mark.parametrize("provider", ["azure", "DIGITALOCEAN", "Aws"])
def test_other_cloud_providers_rejected(provider: str) -> None:
    assert rejected({**GOOD, "cloudProvider": provider}) == "cloudProvider must be one of AZURE, AWS, GCP"


def test_body_shape_and_user_id() -> None:
    assert rejected([GOOD]) == "request body must be a JSON object"
    assert rejected(None) == "request body must be a JSON object"
    assert rejected({**GOOD, "cpucores": 2}) == "unknown field 'cpucores'"
    assert "userId" in rejected({**GOOD, "userId": "default-user"})
    assert parse_create({**GOOD, "userId": "7"}, 7).name == GOOD["name"]
    assert "printable" in rejected({**GOOD, "name": "a\nb"})


def test_workspace_settings_are_kept_apart_and_never_printed() -> None:
    request = parse_create({**GOOD, "githubToken": "ghp_secret", "codeServerPassword": "", "openaiApiKey": None}, 7)
    assert request.settings == {"githubToken": "ghp_secret"}
    assert "ghp_secret" not in repr(request)
    assert rejected({**GOOD, "githubToken": 5}) == "githubToken must be a string"
    assert "NUL" in rejected({**GOOD, "sshPublicKey": "ssh-rsa \x00"})


def test_activity_report() -> None:
    report = parse_activity({"snapshot": {"lastIDEActivity": "2025-10-24T11:00:00Z",
                                          "lastSSHActivity": "2025-10-24T12:55:00+02:00",
                                          "activeIDEConnections": 1, "activeSSHConnections": 0},
                             "timestamp": "2025-10-24T11:00:00.250Z"}, "env-1")
    assert report.snapshot.last_ide_activity == datetime(2025, 10, 24, 11, 0)
    assert report.snapshot.last_ssh_activity == datetime(2025, 10, 24, 10, 55)
    assert report.timestamp == datetime(2025, 10, 24, 11, 0, 0, 250000)
    assert parse_activity({"snapshot": {}, "timestamp": "2025-10-24T11:00:00Z", "environmentId": "env-1"},
                          "env-1").snapshot.active_ide_connections == 0


@pytest.mark.parametrize(("body", "message"), [
    ({"timestamp": "2025-10-24T11:00:00Z"}, "snapshot is required"),
    ({"snapshot": {}}, "timestamp is required"),
    ({"snapshot": [], "timestamp": "2025-10-24T11:00:00Z"}, "snapshot must be an object"),
    ({"snapshot": {}, "timestamp": "yesterday"}, "timestamp must be an RFC 3339 timestamp"),
    ({"snapshot": {}, "timestamp": "2025-10-24T11:00:00"}, "timestamp must be an RFC 3339 timestamp"),
    ({"snapshot": {"lastIDEActivity": "2025-13-01T00:00:00Z"}, "timestamp": "2025-10-24T11:00:00Z"},
     "snapshot.lastIDEActivity must be an RFC 3339 timestamp"),
    ({"snapshot": {"activeIDEConnections": -1}, "timestamp": "2025-10-24T11:00:00Z"},
     "snapshot.activeIDEConnections must be a non-negative integer"),
    ({"snapshot": {"activeSSHConnections": "1"}, "timestamp": "2025-10-24T11:00:00Z"},
     "snapshot.activeSSHConnections must be a non-negative integer"),
    ({"snapshot": {"cpu": 1}, "timestamp": "2025-10-24T11:00:00Z"}, "unknown field 'snapshot.cpu'"),
    ({"snapshot": {}, "timestamp": "2025-10-24T11:00:00Z", "environmentId": "env-2"},
     "environmentId must match the environment in the path"),
])
def test_invalid_activity(body: dict, message: str) -> None:
    with pytest.raises(EnvironmentApiError) as caught:
        parse_activity(body, "env-1")
    assert caught.value.message == message and caught.value.status == 400


def test_paging_parameters() -> None:
    assert parse_page({}) == (1, 20)
    assert parse_page({"page": "3", "pageSize": "100"}) == (3, 100)
    for query, message in (({"page": "0"}, "page must be a positive integer"),
                           ({"page": "-1"}, "page must be a positive integer"),
                           ({"pageSize": "0"}, "pageSize must be between 1 and 100"),
                           ({"pageSize": "101"}, "pageSize must be between 1 and 100"),
                           ({"pageSize": "ten"}, "pageSize must be between 1 and 100")):
        with pytest.raises(EnvironmentApiError) as caught:
            parse_page(query)
        assert caught.value.message == message


def test_transition_table() -> None:
    S = EnvState
    walk = [(S.CREATING, "ready", S.RUNNING), (S.RUNNING, "stop", S.STOPPING), (S.STOPPING, "stopped", S.STOPPED),
            (S.STOPPED, "start", S.STARTING), (S.STARTING, "started", S.RUNNING), (S.ERROR, "start", S.STARTING),
            (S.ERROR, "stop", S.STOPPING), (S.CREATING, "fail", S.ERROR), (S.STARTING, "fail", S.ERROR),
            (S.STOPPING, "fail", S.ERROR)]
    for state, event, target in walk:
        assert next_environment_state(state.value, event) is target
    for state in S:
        assert next_environment_state(state.value, "delete") is S.DELETING
    for state, event in [(S.RUNNING, "start"), (S.STOPPED, "stop"), (S.CREATING, "start"), (S.STARTING, "stop"),
                         (S.DELETING, "start"), (S.RUNNING, "fail"), (S.STOPPED, "ready"), (S.DELETING, "stop")]:
        assert (state, event) not in ENVIRONMENT_TRANSITIONS
        with pytest.raises(IllegalTransition):
            next_environment_state(state.value, event)
    with pytest.raises(IllegalTransition):
        next_environment_state("DELETED", "start")


def _env(**fields: Any) -> Environment:
    defaults: dict[str, Any] = {"id": "env-1", "status": "RUNNING", "created_at": T0, "running_since": T0}
    return Environment(**{**defaults, **fields})


def test_idle_clock_starts_when_running() -> None:
    env = _env(running_since=T0 + timedelta(minutes=5))
    quiet = IdeActivity(0, None)
    assert last_activity(env, quiet, T0 + timedelta(hours=1)) == T0 + timedelta(minutes=5)
    assert auto_stop_at(env, quiet, T0, 60) == T0 + timedelta(minutes=6)
    assert auto_stop_at(env, quiet, T0, 0) is None
    assert auto_stop_at(_env(status="STOPPED"), quiet, T0, 60) is None


def test_reported_and_proxied_activity_count() -> None:
    now = T0 + timedelta(hours=2)
    received = T0 + timedelta(hours=1)
    env = _env(report_received_at=received, last_ide_activity=T0 + timedelta(minutes=30),
               last_ssh_activity=T0 + timedelta(minutes=40))
    assert last_activity(env, IdeActivity(0, None), now) == T0 + timedelta(minutes=40)
    assert last_activity(env, IdeActivity(0, T0 + timedelta(minutes=50)), now) == T0 + timedelta(minutes=50)
    assert last_activity(env, IdeActivity(2, None), now) == now  # an open IDE websocket
    connected = _env(report_received_at=received, active_ssh_connections=1)
    assert last_activity(connected, IdeActivity(0, None), now) == received
    future = _env(report_received_at=received, last_ide_activity=T0 + timedelta(days=365))
    assert last_activity(future, IdeActivity(0, None), now) == received  # a clock ahead counts as arrival


def test_settings_sealed_per_environment() -> None:
    box = SecretBox("k" * 48)
    sealed = seal_settings(box, "env-a", {"githubToken": "ghp_x", "openaiApiKey": "sk-y"})
    assert sealed is not None and "ghp_x" not in sealed and "sk-y" not in sealed
    assert open_settings(box, "env-a", sealed) == {"githubToken": "ghp_x", "openaiApiKey": "sk-y"}
    with pytest.raises(SecretUnreadable):
        open_settings(box, "env-b", sealed)  # copied onto another environment, it does not open
    assert seal_settings(box, "env-a", {}) is None and open_settings(box, "env-a", None) == {}


def test_workspace_env_file_quotes_values() -> None:
    text = workspace_env_file("env-a", {"gitUserName": "O'Brien; rm -rf /", "githubToken": "ghp_x"})
    exports = dict(line.removeprefix("export ").split("=", 1) for line in text.splitlines()[1:])
    assert shlex.split(exports["GIT_USER_NAME"]) == ["O'Brien; rm -rf /"]
    assert exports["GITHUB_TOKEN"] == "ghp_x"


def test_vs_code_url_is_the_gateways_hosted_ide_url() -> None:
    env = _env(owner=3, instance_id=42, name="n", cloud_provider="AWS", cloud_region="r", cpu_cores=2, memory_gb=4,
               storage_gb=20, base_image="node", updated_at=T0)
    tunnel = SimpleNamespace(settings=Settings(public_url="https://zlh.example", ide_domain="ide.example"))
    body = environment_json(tunnel, env, IdeActivity(0, None))  # type: ignore[arg-type]
    assert body["vsCodeUrl"] == "https://zlh.example/__ide/42/" and body["instanceId"] == 42
    hosted = SimpleNamespace(settings=Settings(public_url="https://zlh.example", ide_domain="ide.example",
                                               dev_ide_return_hosted_url=True))
    assert environment_json(hosted, env, IdeActivity(0, None))["vsCodeUrl"] == "https://dev-42.ide.example/"  # type: ignore[arg-type]
    assert environment_json(tunnel, _env(instance_id=None, owner=3, updated_at=T0),  # type: ignore[arg-type]
                            IdeActivity(0, None))["vsCodeUrl"] is None


def test_uptime_reads_like_the_seeds() -> None:
    assert [uptime_text(s) for s in (0, 45.9, 125, 7200, 8130)] == ["0s", "45s", "2m5s", "2h0m0s", "2h15m30s"]
