"""Users, plans and the audit log: reads and writes (synchronous; run them through Store.run).
Storage stores: whether an account may act is decided in control/ (control/accounts.py, control/sessions.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import peewee

from .clock import utcnow
from .environments import Environment
from .models import AuditLog, Instance, Plan, User


class EmailTaken(Exception):
    pass


def normalize_email(email: str) -> str:
    return email.strip().lower()


def create_user(email: str, password_hash: str, role: str = "user", plan: str = "free") -> User:
    try:
        with User._meta.database.atomic():
            return User.create(
                email=normalize_email(email), password_hash=password_hash, role=role, plan=plan
            )
    except peewee.IntegrityError as exc:
        raise EmailTaken(email) from exc


def user_by_email(email: str) -> User | None:
    return User.get_or_none(User.email == normalize_email(email))


def user_by_id(user_id: int) -> User | None:
    return User.get_or_none(User.id == user_id)


def set_password(user_id: int, password_hash: str) -> None:
    User.update(password_hash=password_hash).where(User.id == user_id).execute()


def set_role(user_id: int, role: str) -> None:
    User.update(role=role).where(User.id == user_id).execute()


def set_disabled(user_id: int, disabled_at: datetime | None) -> None:
    User.update(disabled_at=disabled_at).where(User.id == user_id).execute()


def mark_deleted(user_id: int, deleted_at: datetime) -> None:
    """Soft delete: the account can no longer log in or act; its email is freed for a new account
    (the row keeps `deleted-<id>@deleted.invalid`) and its password can never verify."""
    User.update(deleted_at=deleted_at, email=f"deleted-{user_id}@deleted.invalid", password_hash="!").where(
        User.id == user_id).execute()


def account_state(user: User) -> str:
    """active | disabled | deleted (deleted wins)."""
    if user.deleted_at is not None:
        return "deleted"
    return "disabled" if user.disabled_at is not None else "active"


def inactive_accounts() -> dict[int, str]:
    """Every disabled or deleted account: id → disabled | deleted."""
    rows = User.select(User.id, User.disabled_at, User.deleted_at).where(
        User.disabled_at.is_null(False) | User.deleted_at.is_null(False))
    return {row.id: account_state(row) for row in rows}


def list_users(email_contains: str | None, offset: int, limit: int) -> tuple[list[User], int]:
    """A page of accounts (by id), optionally only those whose email contains the text; and the total."""
    query = User.select()
    if email_contains:
        query = query.where(User.email.contains(normalize_email(email_contains)))
    return list(query.order_by(User.id).offset(offset).limit(limit)), query.count()


def owned_resources(user_id: int) -> dict[str, int]:
    """What an account still owns that would outlive it: its instances (game servers and dev
    containers, which include the dev environments' containers) and dev environments."""
    return {"instances": Instance.select().where(Instance.owner == user_id).count(),
            "environments": Environment.select().where(Environment.owner == user_id).count()}


def ensure_plans(plans: list[dict[str, Any]]) -> None:
    """Insert or update the configured plans (the operator's source of truth is configuration). One
    upsert per plan, so replicas seeding at once never collide on the key (it also runs under the
    migrations' lock: storage/migrations)."""
    for plan in plans:
        fields = {k: v for k, v in plan.items() if k != "name"}
        query = Plan.insert(name=plan["name"], **fields)
        if fields:
            query = query.on_conflict(conflict_target=[Plan.name], update=fields)
        else:
            query = query.on_conflict_ignore()
        query.execute()


def plan_by_name(name: str) -> Plan | None:
    return Plan.get_or_none(Plan.name == name)


def audit(action: str, actor_id: int | None, target: str | None = None, **details: Any) -> None:
    AuditLog.create(at=utcnow(), action=action, actor_id=actor_id, target=target, details=details or None)


def audit_entries(*, action_prefix: str | None, target: str | None, actor_id: int | None, before_id: int | None,
                  limit: int) -> list[AuditLog]:
    """Audit entries newest first, filtered; `before_id` pages back from an earlier page's last id."""
    query = AuditLog.select()
    if action_prefix:
        query = query.where(AuditLog.action.startswith(action_prefix))
    if target:
        query = query.where(AuditLog.target == target)
    if actor_id is not None:
        query = query.where(AuditLog.actor_id == actor_id)
    if before_id is not None:
        query = query.where(AuditLog.id < before_id)
    return list(query.order_by(AuditLog.id.desc()).limit(limit))
