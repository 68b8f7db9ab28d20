"""Users, plans and the audit log: reads and writes (synchronous; run them through Store.run)."""

from __future__ import annotations

from typing import Any

import peewee

from .clock import utcnow
from .models import AuditLog, Plan, User


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
