"""The console's rules: short-lived console tokens bound to one user and one server, the check the
relay (gateway/console.py) asks on connect and on re-auth — the one access rule, as for every route —
and the periodic "still allowed?" check that disconnects revoked or suspended users. Consoles of an
account whose sessions end (disable, delete, password reset) close at once on every replica
(control/cluster.py::wire_session_events)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from gateway.console import ConsoleGrant
from gateway.errors import ApiError
from storage import billing as store_billing
from storage import instances as store_instances
from storage import users

from .access import agent_target, may_access, owned, server_not_found
from .api import Ctx, CurrentUser, session_user
from .auth.tokens import TokenKind
from .lifecycle import InstanceState
from .servers import ready_instance
from .services import Services

TOKEN_SCHEMA = {"type": "object", "properties": {"token": {"type": "string"}, "expiresIn": {"type": "integer"},
                                                 "url": {"type": "string"}, "protocol": {"type": "string"}}}


async def console_token(ctx: Ctx, server_id: int) -> dict[str, Any]:
    await ready_instance(ctx, server_id)
    ttl = ctx.services.settings.console_token_ttl
    token = ctx.services.tokens.issue(TokenKind.CONSOLE, ctx.me.id, ttl, sid=server_id, role=ctx.me.role,
                                      fam=ctx.me.family)
    return {"token": token, "expiresIn": ttl, "url": f"/api/servers/{server_id}/console",
            "protocol": 'send {"type":"auth","token":…,"since":<last seq>} as the first frame'}


def console_authorizer(services: Services) -> Callable[[str, int], Awaitable[ConsoleGrant]]:
    """The one access rule for a console token: the session rule (control/api.py::session_user), then
    ownership (control/access.py::grant), then the server's own state."""

    async def authorize(token: str, server_id: int) -> ConsoleGrant:
        claims = services.tokens.verify(TokenKind.CONSOLE, token)
        if claims.get("sid") != server_id:
            raise ApiError(403, "TOKEN_NOT_FOR_THIS_SERVER")
        user = session_user(services, claims)
        instance = owned(user, await services.store.read(store_instances.get_instance, server_id),
                         server_not_found(server_id))
        if instance.state != InstanceState.READY.value:
            raise ApiError(409, "SERVER_NOT_READY")
        if await services.store.read(store_billing.is_suspended, instance.id):
            raise ApiError(403, "SERVER_SUSPENDED")
        return ConsoleGrant(agent_target(instance), user.id, instance.id, float(claims["exp"]))

    return authorize


def console_still_allowed(services: Services) -> Callable[[int, int], Awaitable[bool]]:
    """The rule again for an open console (every ConsoleLimits.access_check_interval): ended sessions
    close it at once through their event; this catches what changed without one (ownership, state,
    a suspension whose event was missed)."""

    async def still_allowed(user_id: int, instance_id: int) -> bool:
        if not services.sessions.allows(user_id, None):
            return False

        def check() -> bool:
            account = users.user_by_id(user_id)
            instance = store_instances.get_instance(instance_id)
            return (account is not None and instance is not None
                    and instance.state == InstanceState.READY.value
                    and may_access(CurrentUser(account.id, account.role), instance.owner_id)
                    and not store_billing.is_suspended(instance.id))

        return await services.store.read(check)

    return still_allowed
