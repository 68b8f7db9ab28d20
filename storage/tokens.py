"""Refresh-token families, password-reset tokens and used single-use tokens. Only hashes of tokens
are ever stored (a used token is kept by its jti, never by the token)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import peewee

from .clock import utcnow
from .models import PasswordReset, RefreshFamily, RefreshToken, UsedToken, User


@dataclass(frozen=True)
class RefreshOutcome:
    """Result of presenting a refresh token: `user_id` when it was valid and is now used up."""

    user_id: int | None
    reason: str | None = None  # unknown | expired | revoked | reused


def start_family(family_id: str, user_id: int) -> None:
    RefreshFamily.create(id=family_id, user=user_id)


def add_refresh_token(family_id: str, token_hash: str, expires_at: datetime) -> None:
    RefreshToken.create(family=family_id, token_hash=token_hash, expires_at=expires_at)


def use_refresh_token(token_hash: str) -> RefreshOutcome:
    """Consume a refresh token. Presenting one already used revokes its whole family."""
    token = (
        RefreshToken.select(RefreshToken, RefreshFamily)
        .join(RefreshFamily)
        .where(RefreshToken.token_hash == token_hash)
        .get_or_none()
    )
    if token is None:
        return RefreshOutcome(None, "unknown")
    family = token.family
    now = utcnow()
    if family.revoked_at is not None:
        return RefreshOutcome(None, "revoked")
    if token.used_at is not None:
        revoke_family(family.id, "reuse-detected")
        return RefreshOutcome(None, "reused")
    if token.expires_at <= now:
        return RefreshOutcome(None, "expired")
    # Conditional update: of two concurrent uses of one token exactly one wins.
    won = (
        RefreshToken.update(used_at=now)
        .where((RefreshToken.id == token.id) & RefreshToken.used_at.is_null())
        .execute()
    )
    if not won:
        revoke_family(family.id, "reuse-detected")
        return RefreshOutcome(None, "reused")
    user = User.get_or_none(User.id == family.user_id)
    if user is None or user.disabled_at is not None or user.deleted_at is not None:
        return RefreshOutcome(None, "revoked")
    return RefreshOutcome(user.id)


def family_of(token_hash: str) -> str | None:
    token = RefreshToken.get_or_none(RefreshToken.token_hash == token_hash)
    return token.family_id if token else None


def revoke_family(family_id: str, reason: str) -> None:
    RefreshFamily.update(revoked_at=utcnow(), revoked_reason=reason).where(
        (RefreshFamily.id == family_id) & RefreshFamily.revoked_at.is_null()
    ).execute()


def revoke_all_families(user_id: int, reason: str) -> list[str]:
    """End every login of `user_id` still open; the ids of the families ended now."""
    open_families = [row.id for row in RefreshFamily.select(RefreshFamily.id).where(
        (RefreshFamily.user == user_id) & RefreshFamily.revoked_at.is_null())]
    if open_families:
        RefreshFamily.update(revoked_at=utcnow(), revoked_reason=reason).where(
            RefreshFamily.id.in_(open_families) & RefreshFamily.revoked_at.is_null()
        ).execute()
    return open_families


def families_ended_since(since: datetime) -> list[str]:
    """Logins ended at or after `since` (older ones' tokens have all expired)."""
    return [row.id for row in RefreshFamily.select(RefreshFamily.id).where(RefreshFamily.revoked_at >= since)]


def use_once(jti: str, expires_at: datetime) -> bool:
    """Record a single-use token as used; False when it already was (on any replica). Rows of
    tokens that have expired are dropped on the way: an expired token is refused by its signature."""
    now = utcnow()
    UsedToken.delete().where(UsedToken.expires_at < now - timedelta(minutes=5)).execute()
    try:
        with UsedToken._meta.database.atomic():
            UsedToken.create(jti=jti, expires_at=expires_at)
    except peewee.IntegrityError:
        return False
    return True


def add_password_reset(user_id: int, token_hash: str, expires_at: datetime) -> None:
    PasswordReset.create(user=user_id, token_hash=token_hash, expires_at=expires_at)


def use_password_reset(token_hash: str) -> int | None:
    """Consume a reset token; the user id when it was valid, unused and unexpired."""
    now = utcnow()
    reset = PasswordReset.get_or_none(PasswordReset.token_hash == token_hash)
    if reset is None or reset.used_at is not None or reset.expires_at <= now:
        return None
    won = (
        PasswordReset.update(used_at=now)
        .where((PasswordReset.id == reset.id) & PasswordReset.used_at.is_null())
        .execute()
    )
    return reset.user_id if won else None

