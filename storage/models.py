"""peewee models: every table the gateway keeps. Plain declarations only; reads and writes live in
the small per-resource modules beside this one. Secrets are stored only as hashes, except the agent
secret, which the gateway must present to the agent and so keeps as issued."""

from __future__ import annotations

import json
from typing import Any

import peewee

from .clock import utcnow
from .db import database


class JSONField(peewee.TextField):
    """JSON stored as text: the same on SQLite and PostgreSQL."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else json.dumps(value, separators=(",", ":"))

    def python_value(self, value: str | None) -> Any:
        return None if value is None else json.loads(value)


class BaseModel(peewee.Model):
    # peewee adds these at class creation; declared here so the type checker knows them too.
    id: Any  # the auto primary key (or the model's own primary key field)

    class Meta:
        database = database
        legacy_table_names = False


class Plan(BaseModel):
    name = peewee.CharField(primary_key=True, max_length=64)
    max_game_servers = peewee.IntegerField()
    max_dev_servers = peewee.IntegerField()
    max_cpu_cores = peewee.IntegerField()
    max_memory_mb = peewee.IntegerField()
    max_disk_gb = peewee.IntegerField()
    max_upload_bytes = peewee.BigIntegerField()
    stripe_price_id = peewee.CharField(null=True, max_length=128)


class User(BaseModel):
    email = peewee.CharField(unique=True, max_length=320)  # stored lower-cased
    password_hash = peewee.CharField(max_length=512)
    role = peewee.CharField(max_length=16, default="user")
    plan = peewee.CharField(max_length=64, default="free")
    disabled_at = peewee.DateTimeField(null=True)
    deleted_at = peewee.DateTimeField(null=True)  # soft delete: the row stays for the audit log and history
    created_at = peewee.DateTimeField(default=utcnow)


class RefreshFamily(BaseModel):
    """One login: every refresh token rotated from it belongs to the family."""

    id = peewee.CharField(primary_key=True, max_length=64)
    user = peewee.ForeignKeyField(User, on_delete="CASCADE", backref="refresh_families")
    user_id: int  # the key column peewee adds beside `user`
    created_at = peewee.DateTimeField(default=utcnow)
    revoked_at = peewee.DateTimeField(null=True)
    revoked_reason = peewee.CharField(null=True, max_length=64)


class RefreshToken(BaseModel):
    family = peewee.ForeignKeyField(RefreshFamily, on_delete="CASCADE", backref="tokens")
    family_id: str  # the key column peewee adds beside `family`
    token_hash = peewee.CharField(unique=True, max_length=128)
    created_at = peewee.DateTimeField(default=utcnow)
    expires_at = peewee.DateTimeField()
    used_at = peewee.DateTimeField(null=True)


class PasswordReset(BaseModel):
    user = peewee.ForeignKeyField(User, on_delete="CASCADE")
    user_id: int  # the key column peewee adds beside `user`
    token_hash = peewee.CharField(unique=True, max_length=128)
    created_at = peewee.DateTimeField(default=utcnow)
    expires_at = peewee.DateTimeField()
    used_at = peewee.DateTimeField(null=True)


class UsedToken(BaseModel):
    """A single-use token (an IDE link token) already traded, by its jti, until it expires."""

    jti = peewee.CharField(primary_key=True, max_length=64)
    expires_at = peewee.DateTimeField(index=True)


class Instance(BaseModel):
    """A ContainerInstance: one container with one agent."""

    vmid = peewee.IntegerField(unique=True)
    owner = peewee.ForeignKeyField(User, on_delete="RESTRICT", backref="instances")
    owner_id: int  # the key column peewee adds beside `owner`
    kind = peewee.CharField(max_length=8)  # game | dev
    name = peewee.CharField(max_length=128)
    engine_type = peewee.CharField(max_length=64)
    payload = JSONField(default=dict)
    allocated_ports = JSONField(default=list)
    provider = peewee.CharField(max_length=32)
    provider_ref = peewee.CharField(null=True, max_length=256)
    agent_host = peewee.CharField(null=True, max_length=256)
    agent_port = peewee.IntegerField(null=True)
    agent_secret = peewee.CharField(null=True, max_length=128)
    ide_port = peewee.IntegerField(null=True)
    state = peewee.CharField(max_length=32)
    state_reason = peewee.TextField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(default=utcnow)
    ready_at = peewee.DateTimeField(null=True)
    # The one power action (start/stop/restart) in flight, claimed with a conditional update so
    # that concurrent requests on any replica see it; it lapses by itself at `power_until`.
    power_action = peewee.CharField(null=True, max_length=16)
    power_until = peewee.DateTimeField(null=True)
    # The replica driving the operation its provisioning state names (storage/operations.py).
    driven_by = peewee.CharField(null=True, max_length=128)


class InstanceArchive(BaseModel):
    """What remains of a deleted instance, taken from its current fields at delete time."""

    instance_id = peewee.IntegerField(null=True)
    vmid = peewee.IntegerField()
    owner_id = peewee.IntegerField(null=True)
    kind = peewee.CharField(null=True, max_length=8)
    name = peewee.CharField(null=True, max_length=128)
    engine_type = peewee.CharField(null=True, max_length=64)
    payload = JSONField(null=True)
    allocated_ports = JSONField(null=True)
    final_state = peewee.CharField(null=True, max_length=32)
    reason = peewee.TextField(null=True)
    created_at = peewee.DateTimeField(null=True)
    deleted_at = peewee.DateTimeField(default=utcnow)


class AgentState(BaseModel):
    """The normalized snapshot the Portal reads; written only by the poller."""

    instance = peewee.ForeignKeyField(Instance, primary_key=True, on_delete="CASCADE")
    instance_id: int  # the key column peewee adds beside `instance`
    alive = peewee.BooleanField(default=False)
    ready = peewee.BooleanField(default=False)
    last_seen_at = peewee.DateTimeField(null=True)
    ready_checked_at = peewee.DateTimeField(null=True)
    last_error = peewee.TextField(null=True)
    server_state = peewee.CharField(null=True, max_length=32)
    players = JSONField(default=list)
    version = peewee.CharField(null=True, max_length=64)
    update_available = peewee.BooleanField(default=False)
    operations = JSONField(default=list)
    resources = JSONField(null=True)
    polled_at = peewee.DateTimeField(null=True)
    failures = peewee.IntegerField(default=0)


class AuditLog(BaseModel):
    at = peewee.DateTimeField(default=utcnow, index=True)
    actor_id = peewee.IntegerField(null=True)
    action = peewee.CharField(max_length=64)
    target = peewee.CharField(null=True, max_length=128)
    details = JSONField(null=True)


class RateLimitBucket(BaseModel):
    """A fixed-window counter shared by every replica."""

    key = peewee.CharField(primary_key=True, max_length=255)
    window_start = peewee.DateTimeField()
    count = peewee.IntegerField(default=0)


ALL_MODELS: list[type[BaseModel]] = [
    Plan,
    User,
    RefreshFamily,
    RefreshToken,
    PasswordReset,
    UsedToken,
    Instance,
    InstanceArchive,
    AgentState,
    AuditLog,
    RateLimitBucket,
]
