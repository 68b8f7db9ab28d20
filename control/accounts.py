"""What an operator does to an account: disable, enable, delete, change its role. The admin API
(control/admin.py) and the command line call these; nothing else changes an account's standing.

Each one stores the change, ends what it must end — every login of the account, so its access tokens,
consoles and IDE sessions stop at once on every replica (control/cluster.py::end_sessions) — and is
written to the audit log with the acting admin (None: the command line).

Delete is a soft delete and is refused (409 ACCOUNT_HAS_RESOURCES) while the account still owns
servers, dev containers or environments: deprovisioning is an explicit, separate step (each has its
own DELETE route), so deleting an account never destroys a customer's data by surprise. An operator
cannot disable, delete or demote their own account (409 OWN_ACCOUNT), so the last admin cannot lock
everyone out by mistake."""

from __future__ import annotations

from typing import Any, Literal

from gateway.errors import ApiError
from storage import tokens as token_store
from storage import users
from storage.clock import isoformat, utcnow

from .cluster import end_sessions
from .services import Services

Role = Literal["user", "admin"]
ROLES: tuple[str, ...] = ("user", "admin")


def account_json(user: Any) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "role": user.role, "plan": user.plan,
            "state": users.account_state(user), "createdAt": isoformat(user.created_at),
            "disabledAt": isoformat(user.disabled_at), "deletedAt": isoformat(user.deleted_at)}


def _not_found(user_id: int) -> ApiError:
    return ApiError(404, "USER_NOT_FOUND", {"id": user_id})


def _existing(user_id: int) -> Any:
    """The account, unless there is none or it was deleted (a deleted account cannot be changed)."""
    user = users.user_by_id(user_id)
    if user is None or user.deleted_at is not None:
        raise _not_found(user_id)
    return user


def _not_self(actor_id: int | None, user_id: int, action: str) -> None:
    if actor_id == user_id:
        raise ApiError(409, "OWN_ACCOUNT", {"reason": f"an admin cannot {action} their own account"})


async def get_account(services: Services, user_id: int) -> dict[str, Any]:
    user = await services.store.read(users.user_by_id, user_id)
    if user is None:
        raise _not_found(user_id)
    return account_json(user)


async def disable(services: Services, actor_id: int | None, user_id: int) -> dict[str, Any]:
    _not_self(actor_id, user_id, "disable")

    def unit() -> tuple[Any, list[str]]:
        user = _existing(user_id)
        if user.disabled_at is None:
            users.set_disabled(user_id, utcnow())
        ended = token_store.revoke_all_families(user_id, "account-disabled")
        users.audit("account.disable", actor_id, f"user:{user_id}", endedLogins=len(ended))
        return users.user_by_id(user_id), ended

    user, ended = await services.store.run(unit)
    await end_sessions(services.events, user=user_id, families=ended, all_logins=True, account="disabled")
    return account_json(user)


async def enable(services: Services, actor_id: int | None, user_id: int) -> dict[str, Any]:
    def unit() -> Any:
        _existing(user_id)
        users.set_disabled(user_id, None)
        users.audit("account.enable", actor_id, f"user:{user_id}")
        return users.user_by_id(user_id)

    user = await services.store.run(unit)
    await end_sessions(services.events, user=user_id, account="active")
    return account_json(user)


async def delete(services: Services, actor_id: int | None, user_id: int) -> dict[str, Any]:
    _not_self(actor_id, user_id, "delete")

    def unit() -> tuple[Any, list[str]]:
        _existing(user_id)
        owned = users.owned_resources(user_id)
        if any(owned.values()):
            raise ApiError(409, "ACCOUNT_HAS_RESOURCES", {
                **owned, "reason": "delete the account's servers and environments first"})
        users.mark_deleted(user_id, utcnow())
        ended = token_store.revoke_all_families(user_id, "account-deleted")
        users.audit("account.delete", actor_id, f"user:{user_id}", endedLogins=len(ended))
        return users.user_by_id(user_id), ended

    user, ended = await services.store.run(unit)
    await end_sessions(services.events, user=user_id, families=ended, all_logins=True, account="deleted")
    return account_json(user)


async def set_role(services: Services, actor_id: int | None, user_id: int, role: str) -> dict[str, Any]:
    """Change the role; the account's logins end, since their tokens carry the old role."""
    if role not in ROLES:
        raise ApiError(422, "VALIDATION_FAILED", [{"field": "role", "message": f"one of {', '.join(ROLES)}"}])
    if role != "admin":
        _not_self(actor_id, user_id, "demote")

    def unit() -> tuple[Any, list[str]]:
        user = _existing(user_id)
        if user.role == role:
            return user, []
        users.set_role(user_id, role)
        ended = token_store.revoke_all_families(user_id, "role-changed")
        users.audit("account.role", actor_id, f"user:{user_id}", role=role, previous=user.role)
        return users.user_by_id(user_id), ended

    user, ended = await services.store.run(unit)
    if ended:
        await end_sessions(services.events, user=user_id, families=ended, all_logins=True)
    return account_json(user)
