"""Dev environments, API v1 (the Dev8 contract of seed 004): `/api/v1/environments` create, get, paged
list, start, stop, activity and delete, each environment backed by one dev container (an Instance of
kind `dev`) on the configured provider; and the idle auto-stop that stops environments nobody uses.

Theory of operation. An environment's status moves only through ENVIRONMENT_TRANSITIONS below, and
each move is a compare-and-set on the stored status, so a user, the idle auto-stop and another
replica can never both move one environment. The statuses map onto the dev container like this:

    CREATING   the instance provisions (reserved … publishing, see control/lifecycle.py); once it
               is ready, the workspace secrets are delivered and the IDE (code-server) is started
    RUNNING    instance ready, container running, IDE started; `vsCodeUrl` opens it through the
               gateway's hosted IDE proxy
    STOPPING   the provider stops the container (a user's stop, or idle auto-stop)
    STOPPED    the container is stopped; the instance row stays `ready`, its agent does not answer
    STARTING   the provider starts the container again, its (new) agent address is recorded, the
               agent is awaited until semantically ready, secrets are re-delivered, the IDE started
    ERROR      provisioning, a start or a stop failed; `statusReason` says why. An ERROR environment
               may be started (when its container exists), stopped or deleted
    DELETING   the Provisioner deletes the instance (edge routes, container, archive); then the
               environment row goes. A DELETE that failed half-way may be repeated

The slow steps run as operations owned by EnvironmentService (a background service in the app's
nursery), so a client that hangs up never leaves an environment half-started; the route waits for its
operation up to `environment_action_wait` seconds. One replica drives each operation: the one whose
move put the environment in its in-progress status names itself in the same statement (`driven_by`,
storage/operations.py). Operations interrupted by a restart resume at start-up, and with several
replicas those of a replica that died are taken over by another (control/cluster.py,
OperationTakeover). A failed delete stays DELETING with no driver, for any replica to finish when the
DELETE is repeated.

Idle auto-stop: an environment's last activity is the latest of: when it became RUNNING, the IDE
proxy's last proxied request (storage/dev.py), "now" while the proxy holds an IDE websocket open, the
supervisor's reported lastIDEActivity / lastSSHActivity, and the moment a report arrived that counted
open IDE or SSH connections (so a supervisor keeps an environment with open connections awake by
reporting). `autoStopAt` is that plus `environment_idle_timeout`; `stop_idle_environments` (one round,
a function of the store, so a leader election can wrap it) stops what is past it, with the reason in
`statusReason`.

Errors answer in the seed's own shape `{"error": CODE, "message": text}` with its codes
(INVALID_REQUEST 400, UNAUTHORIZED 401, NOT_FOUND 404, ENVIRONMENT_ERROR 500, SERVICE_ERROR 500); the
rest of the API keeps the gateway's envelope. Authentication is the gateway's access token; an
environment belongs to its creator (admins may act on any, like everywhere else) and anyone else gets
the same 404 as for one that does not exist.

The optional workspace settings (git token, SSH key, code-server password, AI API keys, git identity)
are sealed (AES-GCM, control/jobs/sealing.py) before they are stored, opened only to deliver them to
the container, and never returned, logged or put in a reason. Never let one reach a response or a log."""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import trio
from quart import Response, request
from werkzeug.exceptions import HTTPException

from gateway.agent_client import AgentTarget, describe_failure, is_agent_ready_result
from gateway.errors import ApiError
from storage import dev as store_dev
from storage import environments as store_env
from storage import instances as store_instances
from storage import operations as store_operations
from storage import users
from storage.clock import isoformat, utcnow
from storage.db import Store
from storage.dev import IdeActivity
from storage.environments import ActivitySnapshot, Environment

from .access import grant
from .api import Ctx, JsonRefused, Route, authenticate, decode_json, json_response, parse_int
from .dev import CODESERVER_TIMEOUT, LIVE_AFTER_INTERVALS, ide_url
from .instances import CreateInstance, InstancePayload, check_plan_limits
from .jobs.sealing import SecretBox, SecretUnreadable
from .lifecycle import (
    ENVIRONMENT_TRANSITIONS,
    EnvState,
    IllegalTransition,
    InstanceState,
    next_environment_state,
)
from .providers.base import ProviderError
from .provisioning import new_agent_secret
from .services import Services

log = logging.getLogger("zlh.environments")

BASE = "/api/v1/environments"
E = EnvState


# --- the seed's error shape -------------------------------------------------------------------------

class EnvironmentApiError(ApiError):
    """An error in the seed's shape: `{"error": code, "message": message}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, {"message": message})
        self.message = message


def invalid(message: str) -> EnvironmentApiError:
    return EnvironmentApiError(400, "INVALID_REQUEST", message)


def not_found(environment_id: str) -> EnvironmentApiError:
    return EnvironmentApiError(404, "NOT_FOUND", f"environment with ID '{environment_id}' not found")


def seed_error(error: EnvironmentApiError) -> Response:
    return json_response({"error": error.code, "message": error.message}, error.status, error.headers or None)


AUTH_REASONS = {"TOKEN_EXPIRED": "access token expired", "SESSION_REVOKED": "this login has ended",
                "ACCOUNT_DISABLED": "account disabled", "ACCOUNT_DELETED": "account deleted"}


def _translated(error: ApiError) -> EnvironmentApiError:
    """A gateway error met on the way (authentication, a body too large) in the seed's terms."""
    if error.status == 401 or error.code == "ACCOUNT_DISABLED":
        reason = AUTH_REASONS.get(error.code, "a valid bearer access token is required")
        translated = EnvironmentApiError(401, "UNAUTHORIZED", reason)
        translated.headers = {"WWW-Authenticate": "Bearer"}
        return translated
    if error.status == 404:
        return EnvironmentApiError(404, "NOT_FOUND", "not found")
    if 400 <= error.status < 500:
        return invalid(error.code.lower().replace("_", " "))
    return EnvironmentApiError(500, "SERVICE_ERROR", "internal service error")


def seed_route(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Authenticate with the gateway's access token — the one rule, control/api.py::authenticate; these
    routes are declared `auth=None` only so that its failures are answered here, in the seed's shape."""

    @functools.wraps(handler)
    async def answer(ctx: Ctx, **params: Any) -> Any:
        try:
            ctx.user = authenticate(ctx.services, ctx.headers)
            return await handler(ctx, **params)
        except EnvironmentApiError as error:
            return seed_error(error)
        except ApiError as error:
            return seed_error(_translated(error))
        except HTTPException as error:
            status = error.code or 500
            return seed_error(invalid("request body too large") if status == 413 else _translated(ApiError(status)))
        except Exception:
            log.exception("environment request %s %s failed", request.method, request.path)
            return seed_error(EnvironmentApiError(500, "SERVICE_ERROR", "internal service error"))

    return answer


# --- validation -------------------------------------------------------------------------------------

CLOUD_PROVIDERS = ("AZURE", "AWS", "GCP")
RESOURCES = {  # field: (minimum, maximum, default), the seed's resource table
    "cpuCores": (1, 4, 2),
    "memoryGB": (1, 16, 4),
    "storageGB": (10, 100, 20),
}
REQUIRED_TEXT = {"name": 128, "cloudProvider": 64, "cloudRegion": 64, "baseImage": 256}  # field: max length
# Optional per-workspace settings: request field → the variable the workspace sees.
WORKSPACE_SETTINGS = {
    "githubToken": "GITHUB_TOKEN",
    "gitUserName": "GIT_USER_NAME",
    "gitUserEmail": "GIT_USER_EMAIL",
    "sshPublicKey": "SSH_PUBLIC_KEY",
    "codeServerPassword": "CODE_SERVER_PASSWORD",
    "anthropicApiKey": "ANTHROPIC_API_KEY",
    "openaiApiKey": "OPENAI_API_KEY",
    "geminiApiKey": "GEMINI_API_KEY",
}
SETTING_MAX_LENGTH = 16 * 1024
CREATE_FIELDS = {"userId", *REQUIRED_TEXT, *RESOURCES, *WORKSPACE_SETTINGS}
PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX = 20, 100
MAX_CONNECTIONS = 1_000_000
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


@dataclass(frozen=True)
class CreateRequest:
    name: str
    cloud_provider: str
    cloud_region: str
    base_image: str
    cpu_cores: int
    memory_gb: int
    storage_gb: int
    settings: dict[str, str] = field(default_factory=dict, repr=False)  # never printed


@dataclass(frozen=True)
class ActivityReport:
    snapshot: ActivitySnapshot
    timestamp: datetime


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_create(data: Any, caller_id: int) -> CreateRequest:
    """The create body, checked exactly as the seed says; the first problem is the answer."""
    if not isinstance(data, dict):
        raise invalid("request body must be a JSON object")
    unknown = sorted(set(data) - CREATE_FIELDS)
    if unknown:
        raise invalid(f"unknown field '{unknown[0]}'")
    user_id = data.get("userId")
    if user_id is not None and user_id != str(caller_id):
        raise invalid("userId must be the authenticated user's id (or left out)")
    text: dict[str, str] = {}
    for name, max_length in REQUIRED_TEXT.items():
        value = data.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise invalid(f"{name} is required")
        if not isinstance(value, str):
            raise invalid(f"{name} must be a string")
        if len(value) > max_length or any(ord(c) < 32 for c in value):
            raise invalid(f"{name} must be at most {max_length} printable characters")
        text[name] = value.strip()
    if text["cloudProvider"] not in CLOUD_PROVIDERS:
        raise invalid(f"cloudProvider must be one of {', '.join(CLOUD_PROVIDERS)}")
    sizes: dict[str, int] = {}
    for name, (low, high, default) in RESOURCES.items():
        value = data.get(name)
        if value is None:
            value = default
        if not _is_int(value):
            raise invalid(f"{name} must be an integer")
        if not low <= value <= high:
            raise invalid(f"{name} must be between {low} and {high}")
        sizes[name] = value
    settings: dict[str, str] = {}
    for name in WORKSPACE_SETTINGS:
        value = data.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise invalid(f"{name} must be a string")
        if len(value) > SETTING_MAX_LENGTH or "\x00" in value:
            raise invalid(f"{name} must be at most {SETTING_MAX_LENGTH} characters without NUL")
        settings[name] = value
    return CreateRequest(text["name"], text["cloudProvider"], text["cloudRegion"], text["baseImage"],
                         sizes["cpuCores"], sizes["memoryGB"], sizes["storageGB"], settings)


def parse_timestamp(value: Any, name: str) -> datetime:
    if not isinstance(value, str) or not RFC3339.match(value):
        raise invalid(f"{name} must be an RFC 3339 timestamp")
    try:
        moment = datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    except ValueError:
        raise invalid(f"{name} must be an RFC 3339 timestamp") from None
    return moment.astimezone(UTC).replace(tzinfo=None)


SNAPSHOT_FIELDS = ("lastIDEActivity", "lastSSHActivity", "activeIDEConnections", "activeSSHConnections")


def parse_activity(data: Any, environment_id: str) -> ActivityReport:
    if not isinstance(data, dict):
        raise invalid("request body must be a JSON object")
    unknown = sorted(set(data) - {"snapshot", "timestamp", "environmentId"})
    if unknown:
        raise invalid(f"unknown field '{unknown[0]}'")
    if data.get("environmentId") not in (None, environment_id):
        raise invalid("environmentId must match the environment in the path")
    snapshot = data.get("snapshot")
    if snapshot is None:
        raise invalid("snapshot is required")
    if not isinstance(snapshot, dict):
        raise invalid("snapshot must be an object")
    if data.get("timestamp") is None:
        raise invalid("timestamp is required")
    timestamp = parse_timestamp(data["timestamp"], "timestamp")
    unknown = sorted(set(snapshot) - set(SNAPSHOT_FIELDS))
    if unknown:
        raise invalid(f"unknown field 'snapshot.{unknown[0]}'")
    moments: dict[str, datetime | None] = {}
    for name in ("lastIDEActivity", "lastSSHActivity"):
        value = snapshot.get(name)
        moments[name] = None if value is None else parse_timestamp(value, f"snapshot.{name}")
    counts: dict[str, int] = {}
    for name in ("activeIDEConnections", "activeSSHConnections"):
        value = snapshot.get(name, 0)
        if not _is_int(value) or not 0 <= value <= MAX_CONNECTIONS:
            raise invalid(f"snapshot.{name} must be a non-negative integer")
        counts[name] = value
    return ActivityReport(ActivitySnapshot(moments["lastIDEActivity"], moments["lastSSHActivity"],
                                           counts["activeIDEConnections"], counts["activeSSHConnections"]), timestamp)


MAX_PAGE = 2**31 - 1  # page * pageSize stays a valid SQL OFFSET on SQLite and PostgreSQL


def parse_page(query: dict[str, str]) -> tuple[int, int]:
    numbers: dict[str, int] = {}
    for name, default, high in (("page", 1, None), ("pageSize", PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)):
        raw = query.get(name)
        if raw is None or raw == "":
            numbers[name] = default
            continue
        value = parse_int(raw, 1, high or MAX_PAGE)
        if value is None:
            bound = f"between 1 and {high}" if high else "a positive integer"
            raise invalid(f"{name} must be {bound}")
        numbers[name] = value
    return numbers["page"], numbers["pageSize"]


async def read_json() -> Any:
    if request.mimetype != "application/json":
        raise invalid("Content-Type must be application/json")
    raw = await request.get_data(as_text=False)
    assert isinstance(raw, bytes)
    try:
        return decode_json(raw)
    except JsonRefused:  # the seed's own message, whatever the reason
        raise invalid("request body is not valid JSON") from None


# --- workspace settings (secrets) -----------------------------------------------------------------

SECRETS_DIR = ".zlh"
SECRETS_FILE = f"{SECRETS_DIR}/workspace.env"


def secret_context(environment_id: str) -> str:
    return f"environment:{environment_id}"


def seal_settings(box: SecretBox, environment_id: str, settings: dict[str, str]) -> str | None:
    if not settings:
        return None
    return box.seal(json.dumps(settings, separators=(",", ":")), secret_context(environment_id))


def open_settings(box: SecretBox, environment_id: str, sealed: str | None) -> dict[str, str]:
    if not sealed:
        return {}
    opened: dict[str, str] = json.loads(box.open(sealed, secret_context(environment_id)))
    return opened


def workspace_env_file(environment_id: str, settings: dict[str, str]) -> str:
    lines = [f"# Workspace settings of {environment_id}, written by the ZLH gateway. Never commit this file."]
    lines += [f"export {WORKSPACE_SETTINGS[name]}={shlex.quote(value)}" for name, value in sorted(settings.items())]
    return "\n".join(lines) + "\n"


# --- idle rule --------------------------------------------------------------------------------------

def last_activity(environment: Environment, ide: IdeActivity, now: datetime) -> datetime:
    """The latest sign of use (see the module notes). Reported times later than their report's
    arrival count as the arrival: a clock ahead in the container cannot keep an environment awake."""
    moments = [environment.created_at, environment.running_since, ide.last_request_at]
    received = environment.report_received_at
    if received is not None:
        moments += [min(t, received) for t in (environment.last_ide_activity, environment.last_ssh_activity)
                    if t is not None]
        if environment.active_ide_connections or environment.active_ssh_connections:
            moments.append(received)
    if ide.open_websockets > 0:
        moments.append(now)
    return max(m for m in moments if m is not None)


def auto_stop_at(environment: Environment, ide: IdeActivity, now: datetime, idle_timeout: float) -> datetime | None:
    """When idle auto-stop will stop this environment if nothing changes (None: it will not)."""
    if environment.status != E.RUNNING.value or idle_timeout <= 0:
        return None
    return last_activity(environment, ide, now) + timedelta(seconds=idle_timeout)


def idle_reason(since: datetime, idle_timeout: float) -> str:
    minutes = idle_timeout / 60
    span = f"{minutes:g} min" if minutes >= 1 else f"{idle_timeout:g} s"
    return f"auto-stopped: idle for {span} (no IDE or SSH connection, no activity since {isoformat(since)})"


IdleStop = Callable[[Environment, str], Awaitable[None]]


async def stop_idle_environments(store: Store, stop: IdleStop, *, idle_timeout: float,
                                 ide_live_window: float) -> list[str]:
    """One idle auto-stop round over every RUNNING environment; the ids it stopped. Takes only the
    store and the stop action, so one replica (a leader) can run it for the whole fleet."""
    if idle_timeout <= 0:
        return []
    now = utcnow()
    rows = await store.run(store_env.running_with_ide_activity, E.RUNNING.value,
                           now - timedelta(seconds=ide_live_window))
    stopped = []
    for environment, ide in rows:
        deadline = auto_stop_at(environment, ide, now, idle_timeout)
        if deadline is not None and now >= deadline:
            await stop(environment, idle_reason(last_activity(environment, ide, now), idle_timeout))
            stopped.append(environment.id)
    return stopped


# --- presentation -----------------------------------------------------------------------------------

def environment_json(services: Services, environment: Environment, ide: IdeActivity) -> dict[str, Any]:
    """The seed's environment object (its Azure-only fields are null here: there is no Azure), plus
    the gateway's: the dev container's id, why it is in its status, and when idle auto-stop will
    stop it. No workspace setting is ever part of it."""
    now = utcnow()
    instance_id = environment.instance_id
    return {
        "id": environment.id,
        "userId": str(environment.owner_id),
        "name": environment.name,
        "status": environment.status,
        "statusReason": environment.status_reason,
        "cloudProvider": environment.cloud_provider,
        "cloudRegion": environment.cloud_region,
        "aciContainerGroupId": None,
        "aciPublicIp": None,
        "azureFileShareName": None,
        "vsCodeUrl": ide_url(services, instance_id)[0] if instance_id is not None else None,
        "cpuCores": environment.cpu_cores,
        "memoryGB": environment.memory_gb,
        "storageGB": environment.storage_gb,
        "baseImage": environment.base_image,
        "createdAt": isoformat(environment.created_at),
        "updatedAt": isoformat(environment.updated_at),
        "lastAccessedAt": isoformat(last_activity(environment, ide, now)),
        "autoStopAt": isoformat(auto_stop_at(environment, ide, now, services.settings.environment_idle_timeout)),
        "instanceId": instance_id,
    }


def snapshot_json(snapshot: ActivitySnapshot) -> dict[str, Any]:
    return {"lastIDEActivity": isoformat(snapshot.last_ide_activity),
            "lastSSHActivity": isoformat(snapshot.last_ssh_activity),
            "activeIDEConnections": snapshot.active_ide_connections,
            "activeSSHConnections": snapshot.active_ssh_connections}


# --- operations -------------------------------------------------------------------------------------

class OperationFailed(Exception):
    """A step of an operation failed; the message is the reason shown (never a secret)."""


# The in-progress statuses and the operation each names.
RESUMED = {E.CREATING: "create", E.STARTING: "start", E.STOPPING: "stop", E.DELETING: "delete"}


@dataclass
class Operation:
    kind: str
    done: trio.Event = field(default_factory=trio.Event)
    failure: str | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class EnvironmentService:
    """Owns every slow environment operation (bring-up, start, stop, delete) and the idle auto-stop
    loop, in its own nursery inside the app's. At most one operation per environment runs here."""

    def __init__(self, services: Services, *, poll: float = 0.25) -> None:
        self.services = services
        self.poll = poll
        self._box = SecretBox(services.settings.jwt_secret)
        self._nursery: trio.Nursery | None = None
        self._ops: dict[str, Operation] = {}
        self.idle_rounds = 0

    @property
    def store(self) -> Store:
        return self.services.store

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            claim = functools.partial(store_operations.claim_environment_operations, [s.value for s in RESUMED])
            await nursery.start(self.services.takeover.run, self.store, claim, self.resume)
            task_status.started()
            await self._idle_loop()

    def resume(self, environment: Environment) -> None:
        """Drive the operation `environment`'s status names from where it stopped (every step is
        idempotent): one a previous process left unfinished, or one taken over from a dead replica."""
        kind = RESUMED[EnvState(environment.status)]
        work = {"create": functools.partial(self._bring_up, environment.id),
                "start": functools.partial(self._start, environment.id),
                "stop": functools.partial(self._stop, environment.id, environment.status_reason),
                "delete": functools.partial(self._delete, environment.id, None)}[kind]
        self.launch(environment.id, kind, work)

    async def move_and_drive(self, environment: Environment, event: str, **fields: Any) -> bool:
        """Move an environment on `event` into an in-progress status, naming this replica the driver of
        its operation in the same statement (so no other replica starts it); False if its status
        changed meanwhile."""
        state = next_environment_state(environment.status, event)
        return await self.store.run(store_env.move_environment, environment.id, environment.status, state.value,
                                    driven_by=self.services.settings.replica_id, **fields)

    async def drive(self, environment_id: str, status: str) -> bool:
        """Drive the operation of an environment already in `status` (a repeated request): only if
        no live replica drives it, or this one does."""
        takeover = self.services.takeover
        return await self.store.run(store_operations.claim_environment, environment_id, status,
                                    takeover.replica_id, takeover.ttl)

    async def _idle_loop(self) -> None:
        settings = self.services.settings
        if settings.environment_idle_timeout <= 0:
            await trio.sleep_forever()
        while True:
            await trio.sleep(settings.environment_idle_check_interval)
            cluster = self.services.cluster
            if cluster is not None and not cluster.is_leader():
                continue  # once across the fleet: only the leader replica stops idle environments
            try:
                await self.idle_round()
            except Exception:
                log.exception("idle auto-stop round failed")

    async def idle_round(self) -> list[str]:
        settings = self.services.settings
        stopped = await stop_idle_environments(
            self.store, self.stop_idle, idle_timeout=settings.environment_idle_timeout,
            ide_live_window=settings.ide_activity_interval * LIVE_AFTER_INTERVALS)
        self.idle_rounds += 1
        return stopped

    async def stop_idle(self, environment: Environment, reason: str) -> None:
        if await self.move_and_drive(environment, "stop", status_reason=reason):
            log.info("auto-stopping idle environment", extra={"fields": {"environment": environment.id}})
            self.launch(environment.id, "stop", functools.partial(self._stop, environment.id, reason))

    # -- running operations

    def launch(self, environment_id: str, kind: str, work: Callable[[], Awaitable[None]]) -> Operation:
        assert self._nursery is not None, "EnvironmentService is not running"
        operation = Operation(kind)
        self._ops[environment_id] = operation
        self._nursery.start_soon(self._perform, environment_id, operation, work)
        return operation

    def cancel(self, environment_id: str) -> None:
        operation = self._ops.pop(environment_id, None)
        if operation is not None:
            operation.scope.cancel()

    async def _perform(self, environment_id: str, operation: Operation, work: Callable[[], Awaitable[None]]) -> None:
        with operation.scope:
            try:
                await work()
            except (OperationFailed, ProviderError) as exc:
                operation.failure = str(exc)
            except Exception as exc:
                log.exception("environment %s: %s crashed", environment_id, operation.kind)
                operation.failure = f"internal error: {type(exc).__name__}"
            if operation.failure is not None:
                await self._fail(environment_id, f"{operation.kind} failed: {operation.failure}")
        operation.done.set()
        if self._ops.get(environment_id) is operation:
            del self._ops[environment_id]

    async def _fail(self, environment_id: str, reason: str) -> None:
        log.warning("environment operation failed", extra={"fields": {"environment": environment_id,
                                                                      "reason": reason}})

        def record() -> None:
            environment = store_env.get_environment(environment_id)
            if environment is None:
                return
            if environment.status == E.DELETING.value:  # stays DELETING, undriven: a repeated DELETE finishes it
                store_env.move_environment(environment_id, E.DELETING.value, E.DELETING.value, status_reason=reason,
                                           driven_by=None)
            elif (EnvState(environment.status), "fail") in ENVIRONMENT_TRANSITIONS:
                store_env.move_environment(environment_id, environment.status,
                                           next_environment_state(environment.status, "fail").value,
                                           status_reason=reason)

        with trio.CancelScope(shield=True):
            await self.store.run(record)

    async def wait(self, operation: Operation) -> bool:
        with trio.move_on_after(self.services.settings.environment_action_wait):
            await operation.done.wait()
        return operation.done.is_set()

    # -- the steps

    async def _environment_and_instance(self, environment_id: str) -> tuple[Environment | None, Any]:
        def load() -> tuple[Environment | None, Any]:
            environment = store_env.get_environment(environment_id)
            if environment is None or environment.instance_id is None:
                return environment, None
            return environment, store_instances.get_instance(environment.instance_id)

        return await self.store.run(load)

    async def _move(self, environment: Environment, event: str, **fields: Any) -> None:
        state = next_environment_state(environment.status, event)
        if not await self.store.run(store_env.move_environment, environment.id, environment.status, state.value,
                                    **fields):
            raise OperationFailed(f"environment changed state during {event}")
        environment.status = state.value

    async def _bring_up(self, environment_id: str) -> None:
        """CREATING: wait for the dev container's provisioning, then activate it."""
        while True:
            environment, instance = await self._environment_and_instance(environment_id)
            if environment is None or environment.status != E.CREATING.value:
                return
            if instance is None:
                raise OperationFailed("the dev container is gone")
            if instance.state == InstanceState.FAILED.value:
                raise OperationFailed(f"provisioning the dev container failed: {instance.state_reason}")
            if instance.state == InstanceState.READY.value:
                break
            await trio.sleep(self.poll)
        await self._activate(environment, instance)
        await self._move(environment, "ready", running_since=utcnow(), status_reason=None)

    async def _start(self, environment_id: str) -> None:
        """STARTING: start the container, record its agent's address, await readiness, activate."""
        environment, instance = await self._environment_and_instance(environment_id)
        if environment is None or environment.status != E.STARTING.value:
            return
        if instance is None:
            raise OperationFailed("the dev container is gone")
        provider = self.services.provisioner.provider
        await provider.start(instance.vmid)
        current = getattr(provider, "current", None)
        container = await current(instance.vmid) if current is not None else None
        if container is not None and instance.provider_ref and container.provider_ref != instance.provider_ref:
            raise OperationFailed("the dev container here is not the one the database records")
        if container is not None:  # recorded before it is waited on; never over another container's
            fields = {"agent_host": container.agent_host, "agent_port": container.agent_port,
                      "ide_port": container.ide_port}
            await self.store.run(store_instances.record_made, instance.id, instance.state, instance.provider_ref,
                                 **fields)
            for key, value in fields.items():
                setattr(instance, key, value)
        await self._await_agent_ready(instance)
        await self._activate(environment, instance)
        await self._move(environment, "started", running_since=utcnow(), status_reason=None)

    async def _await_agent_ready(self, instance: Any) -> None:
        target = AgentTarget(instance.agent_host, instance.agent_port, instance.agent_secret)
        timeout = self.services.settings.ready_timeout
        last = None
        with trio.move_on_after(timeout):
            while True:
                last = await self.services.agents.get_agent_ready(target)
                if is_agent_ready_result(last):
                    return
                await trio.sleep(self.poll)
        reason = describe_failure(last) if last is not None else "no answer"
        raise OperationFailed(f"the dev container's agent was not ready after {timeout:.0f}s ({reason})")

    async def _activate(self, environment: Environment, instance: Any) -> None:
        """Deliver the workspace settings, then start the IDE (both idempotent)."""
        if not instance.agent_port or not instance.agent_secret:
            raise OperationFailed("the dev container has no agent address")
        target = AgentTarget(instance.agent_host, instance.agent_port, instance.agent_secret)
        agents = self.services.agents
        try:
            settings = open_settings(self._box, environment.id, environment.sealed_secrets)
        except SecretUnreadable:
            raise OperationFailed("the workspace settings do not open under this gateway's key") from None
        if settings:
            for path, content in ((f"{SECRETS_DIR}/.gitignore", "*\n"),
                                  (SECRETS_FILE, workspace_env_file(environment.id, settings))):
                result = await agents.call(target, "PUT", "/files/content",
                                           json_body={"path": path, "content": content})
                if not result.ok:  # the reason names the status only: the body could echo the content
                    raise OperationFailed(f"could not deliver the workspace settings ({describe_failure(result)})")
        result = await agents.call(target, "POST", "/dev/codeserver/start", timeout=CODESERVER_TIMEOUT)
        if not result.ok or not (isinstance(result.body, dict) and result.body.get("running") is True):
            raise OperationFailed(f"the IDE did not start ({describe_failure(result)})")

    async def _stop(self, environment_id: str, reason: str | None) -> None:
        """STOPPING: stop the container."""
        environment, instance = await self._environment_and_instance(environment_id)
        if environment is None or environment.status != E.STOPPING.value:
            return
        if instance is None:
            raise OperationFailed("the dev container is gone")
        await self.services.provisioner.provider.stop(instance.vmid)
        await self._move(environment, "stopped", status_reason=reason)

    async def _delete(self, environment_id: str, actor_id: int | None) -> None:
        """DELETING: the dev container goes through the Provisioner (edge routes, container, archive),
        then the environment row and its IDE activity."""
        environment, instance = await self._environment_and_instance(environment_id)
        if environment is None or environment.status != E.DELETING.value:
            return
        with trio.CancelScope(shield=True):
            if instance is not None:
                await self.services.provisioner.delete(instance, actor_id)

            def forget() -> None:
                if environment.instance_id is not None:
                    store_dev.forget_ide_activity(environment.instance_id)
                store_env.delete_environment(environment_id)
                users.audit("environment.deleted", actor_id, f"environment:{environment_id}")

            await self.store.run(forget)

    # -- what the routes ask for

    def create_operation(self, environment_id: str) -> Operation:
        return self.launch(environment_id, "create", functools.partial(self._bring_up, environment_id))

    def start_operation(self, environment_id: str) -> Operation:
        return self.launch(environment_id, "start", functools.partial(self._start, environment_id))

    def stop_operation(self, environment_id: str, reason: str | None) -> Operation:
        return self.launch(environment_id, "stop", functools.partial(self._stop, environment_id, reason))

    def delete_operation(self, environment_id: str, actor_id: int | None) -> Operation:
        self.cancel(environment_id)
        return self.launch(environment_id, "delete", functools.partial(self._delete, environment_id, actor_id))

    def seal(self, environment_id: str, settings: dict[str, str]) -> str | None:
        return seal_settings(self._box, environment_id, settings)


# --- routes -----------------------------------------------------------------------------------------

def service(ctx: Ctx) -> EnvironmentService:
    environments: EnvironmentService = ctx.services.environments
    return environments


def ide_live_after(services: Services) -> datetime:
    return utcnow() - timedelta(seconds=services.settings.ide_activity_interval * LIVE_AFTER_INTERVALS)


async def owned_environment(ctx: Ctx, environment_id: str) -> tuple[Environment, IdeActivity]:
    """The one ownership check of this API: not yours looks exactly like not there."""
    found = await ctx.services.store.run(store_env.environment_with_ide_activity, environment_id,
                                        ide_live_after(ctx.services))
    grant(ctx.me, found[0].owner_id if found is not None else None, not_found(environment_id))
    assert found is not None  # grant raised otherwise
    return found


def plan_limit_message(error: ApiError) -> str:
    details = error.details if isinstance(error.details, dict) else {}
    plan, allowed = details.get("plan"), int(details.get("allowed") or 0)
    limit = details.get("limit")
    if limit == "max_dev_servers":
        return f"plan '{plan}' allows at most {allowed} dev environment(s); you have {details.get('current')}"
    names = {"cores": ("cpuCores", 1), "memoryMb": ("memoryGB", 1024), "diskGb": ("storageGB", 1)}
    if limit in names:
        name, unit = names[limit]
        return (f"plan '{plan}' allows at most {allowed // unit} {name} "
                f"(requested {details.get('requested', 0) // unit})")
    return details.get("reason") or "your plan does not allow this environment"


@seed_route
async def create_environment(ctx: Ctx) -> tuple[dict[str, Any], int]:
    body = parse_create(await read_json(), ctx.me.id)
    services = ctx.services
    environment_id = "env-" + secrets.token_hex(8)
    sealed = service(ctx).seal(environment_id, body.settings)
    payload = {"cores": body.cpu_cores, "memoryMb": body.memory_gb * 1024, "diskGb": body.storage_gb,
               "environmentId": environment_id}
    plan_request = CreateInstance.model_construct(kind="dev", payload=InstancePayload.model_construct(
        cores=body.cpu_cores, memory_mb=body.memory_gb * 1024, disk_gb=body.storage_gb))

    def record() -> tuple[Environment, Any]:
        user = users.user_by_id(ctx.me.id)
        if user is None or users.account_state(user) != "active":  # changed since authentication
            raise EnvironmentApiError(401, "UNAUTHORIZED", "account not found or disabled")
        plan = users.plan_by_name(user.plan)
        counts = {kind: store_instances.count_by_kind(user.id, kind) for kind in ("game", "dev")}
        try:
            check_plan_limits(user, plan, plan_request, counts)
        except ApiError as error:
            raise invalid(plan_limit_message(error)) from None
        for _attempt in range(5):
            try:
                instance = store_instances.create_instance(
                    vmid=store_instances.next_free_vmid(), owner=user.id, kind="dev", name=body.name,
                    engine_type="vscode", payload=payload, allocated_ports=[], provider=services.settings.provider,
                    agent_secret=new_agent_secret(), state=InstanceState.RESERVED.value,
                    driven_by=services.settings.replica_id)
                break
            except store_instances.VmidTaken:
                continue
        else:
            raise EnvironmentApiError(500, "ENVIRONMENT_ERROR", "could not reserve a container id")
        environment = store_env.create_environment(
            id=environment_id, owner=user.id, instance_id=instance.id, name=body.name,
            cloud_provider=body.cloud_provider, cloud_region=body.cloud_region, cpu_cores=body.cpu_cores,
            memory_gb=body.memory_gb, storage_gb=body.storage_gb, base_image=body.base_image,
            sealed_secrets=sealed, status=E.CREATING.value, driven_by=services.settings.replica_id)
        users.audit("environment.create", user.id, f"environment:{environment_id}", instance=instance.id)
        return environment, instance

    environment, instance = await services.store.run(record)
    services.provisioner.submit(instance.id)
    service(ctx).create_operation(environment.id)
    return {"environment": environment_json(services, environment, IdeActivity(0, None)),
            "message": "Environment created successfully"}, 201


@seed_route
async def get_environment(ctx: Ctx, environment_id: str) -> dict[str, Any]:
    environment, ide = await owned_environment(ctx, environment_id)
    return {"environment": environment_json(ctx.services, environment, ide)}


@seed_route
async def list_environments(ctx: Ctx) -> dict[str, Any]:
    page, page_size = parse_page(ctx.query)
    live_after = ide_live_after(ctx.services)

    def load() -> tuple[list[tuple[Environment, IdeActivity]], int]:
        rows, total = store_env.environment_page(ctx.me.id, page, page_size)
        ide = store_env.ide_activity_of([r.instance_id for r in rows if r.instance_id is not None], live_after)
        return [(r, ide.get(r.instance_id or 0, IdeActivity(0, None))) for r in rows], total

    rows, total = await ctx.services.store.run(load)
    return {"environments": [environment_json(ctx.services, env, ide) for env, ide in rows],
            "total": total, "page": page, "pageSize": page_size}


async def _begin(ctx: Ctx, environment: Environment, event: str, **fields: Any) -> None:
    """Move an environment on `event`, this replica driving the operation, or answer 400 naming why
    it cannot."""
    try:
        moved = await service(ctx).move_and_drive(environment, event, **fields)
    except IllegalTransition:
        raise invalid(f"environment '{environment.id}' cannot be {'started' if event == 'start' else 'stopped'} "
                      f"while it is {environment.status}") from None
    if not moved:
        raise invalid(f"environment '{environment.id}' changed state meanwhile; try again")


async def _finish(ctx: Ctx, environment: Environment, operation: Operation, done: str,
                  pending: str) -> dict[str, Any]:
    if not await service(ctx).wait(operation):
        current, _ide = await owned_environment(ctx, environment.id)
        return {"message": pending, "id": environment.id, "status": current.status}
    if operation.failure is not None:
        raise EnvironmentApiError(500, "ENVIRONMENT_ERROR", operation.failure)
    return {"message": done, "id": environment.id}


@seed_route
async def start_environment(ctx: Ctx, environment_id: str) -> dict[str, Any]:
    environment, _ide = await owned_environment(ctx, environment_id)
    if environment.status == E.ERROR.value:  # only a container that exists can be started again
        instance = await ctx.services.store.run(store_instances.get_instance, environment.instance_id or 0)
        if instance is None or instance.state != InstanceState.READY.value:
            raise invalid(f"environment '{environment_id}' has no dev container to start; delete it and create another")
    await _begin(ctx, environment, "start", status_reason=None)
    operation = service(ctx).start_operation(environment_id)
    return await _finish(ctx, environment, operation, "Environment started successfully", "Environment is starting")


@seed_route
async def stop_environment(ctx: Ctx, environment_id: str) -> dict[str, Any]:
    environment, _ide = await owned_environment(ctx, environment_id)
    reason = "stopped by the user"
    await _begin(ctx, environment, "stop", status_reason=reason)
    operation = service(ctx).stop_operation(environment_id, reason)
    return await _finish(ctx, environment, operation, "Environment stopped successfully", "Environment is stopping")


@seed_route
async def report_activity(ctx: Ctx, environment_id: str) -> dict[str, Any]:
    environment, _ide = await owned_environment(ctx, environment_id)
    report = parse_activity(await read_json(), environment_id)
    if await ctx.services.store.run(store_env.record_activity, environment_id, report.snapshot,
                                    report.timestamp) is None:
        raise not_found(environment_id)
    return {"message": "Activity recorded", "environmentId": environment.id,
            "snapshot": snapshot_json(report.snapshot), "timestamp": isoformat(report.timestamp)}


@seed_route
async def delete_environment(ctx: Ctx, environment_id: str) -> dict[str, Any]:
    environment, _ide = await owned_environment(ctx, environment_id)
    while environment.status != E.DELETING.value:
        if await service(ctx).move_and_drive(environment, "delete"):
            break
        environment, _ide = await owned_environment(ctx, environment_id)
    if not await service(ctx).drive(environment_id, E.DELETING.value):
        return {"message": "Environment is being deleted", "id": environment.id, "status": E.DELETING.value}
    operation = service(ctx).delete_operation(environment_id, ctx.me.id)
    return await _finish(ctx, environment, operation, "Environment deleted successfully",
                         "Environment is being deleted")


# --- the route list ---------------------------------------------------------------------------------

ERROR_DOC = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["error", "message"],
    "properties": {"error": {"enum": ["INVALID_REQUEST", "NOT_FOUND", "UNAUTHORIZED", "ENVIRONMENT_ERROR",
                                      "SERVICE_ERROR"]}, "message": {"type": "string"}}}}}}
ENVIRONMENT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "id": {"type": "string"}, "userId": {"type": "string"}, "name": {"type": "string"},
    "status": {"enum": [s.value for s in EnvState]}, "statusReason": {"type": ["string", "null"]},
    "cloudProvider": {"enum": list(CLOUD_PROVIDERS)}, "cloudRegion": {"type": "string"},
    "vsCodeUrl": {"type": ["string", "null"]}, "cpuCores": {"type": "integer"}, "memoryGB": {"type": "integer"},
    "storageGB": {"type": "integer"}, "baseImage": {"type": "string"}, "createdAt": {"type": "string"},
    "updatedAt": {"type": "string"}, "lastAccessedAt": {"type": "string"},
    "autoStopAt": {"type": ["string", "null"], "description": "when idle auto-stop stops it if nothing changes"},
    "instanceId": {"type": ["integer", "null"], "description": "its dev container (/api/dev/{id}/…)"}}}
AUTH_NOTE = ("Bearer access token of the gateway required. Errors in the seed's shape "
             "{error: INVALID_REQUEST|NOT_FOUND|UNAUTHORIZED|ENVIRONMENT_ERROR|SERVICE_ERROR, message}.")


def routes() -> list[Route]:
    tags = ("environments",)
    item = f"{BASE}/<environment_id>"

    def doc(statuses: dict[str, str], description: str = "") -> dict[str, Any]:
        return {"description": (description + " " + AUTH_NOTE).strip(),
                "responses": {code: {"description": text, **ERROR_DOC} for code, text in statuses.items()}}

    return [
        Route("POST", BASE, create_environment, "Create a dev environment (a dev container on the configured "
              "provider); answers CREATING at once", auth=None, status=201, tags=tags,
              response={"type": "object", "properties": {"environment": ENVIRONMENT_SCHEMA, "message": {}}},
              extra_doc=doc({"400": "invalid body, value out of range, or over the plan's limits",
                             "401": "no valid access token", "500": "ENVIRONMENT_ERROR or SERVICE_ERROR"},
                            "Body: name, cloudProvider (AZURE|AWS|GCP), cloudRegion, baseImage required; cpuCores "
                            "1–4 (2), memoryGB 1–16 (4), storageGB 10–100 (20); optional githubToken, gitUserName, "
                            "gitUserEmail, sshPublicKey, codeServerPassword, anthropicApiKey, openaiApiKey, "
                            "geminiApiKey, stored sealed and delivered to the container, never returned.")),
        Route("GET", BASE, list_environments, "The caller's environments, paged (page ≥ 1, pageSize 1–100, "
              "default 20)", auth=None, tags=tags,
              extra_doc={**doc({"400": "bad page or pageSize", "401": "no valid access token"}), "parameters": [
                  {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                  {"name": "pageSize", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}}]}),
        Route("GET", item, get_environment, "One environment", auth=None, tags=tags,
              response={"type": "object", "properties": {"environment": ENVIRONMENT_SCHEMA}},
              extra_doc=doc({"404": "no such environment (or not yours)", "401": "no valid access token"})),
        Route("POST", f"{item}/start", start_environment, "Start a STOPPED (or ERROR) environment", auth=None,
              tags=tags, extra_doc=doc({"400": "cannot be started in its status", "404": "not found",
                                        "401": "no valid access token", "500": "ENVIRONMENT_ERROR"})),
        Route("POST", f"{item}/stop", stop_environment, "Stop a RUNNING (or ERROR) environment", auth=None,
              tags=tags, extra_doc=doc({"400": "cannot be stopped in its status", "404": "not found",
                                        "401": "no valid access token", "500": "ENVIRONMENT_ERROR"})),
        Route("POST", f"{item}/activity", report_activity,
              "Record the workspace supervisor's activity snapshot (drives idle auto-stop)", auth=None, tags=tags,
              extra_doc=doc({"400": "invalid activity data", "404": "not found", "401": "no valid access token"})),
        Route("DELETE", item, delete_environment, "Delete an environment and its dev container", auth=None,
              tags=tags, extra_doc=doc({"404": "not found", "401": "no valid access token",
                                        "500": "ENVIRONMENT_ERROR"})),
    ]
