"""Dev containers: IDE tokens, code-server controls, the rule the IDE proxy (gateway/ide_proxy.py)
asks before forwarding, and the record of IDE activity per instance that idle auto-stop reads.

Tokens: `POST /api/dev/:id/ide-token` issues a short-lived IDE *link* token (kind IDE, its own issuer,
audience and key; bound to the user, the instance and the login — refresh-token family — it was asked
with). The proxy trades it, once it arrives in a query string, for an IDE *session* token kept in the
browser's IDE cookie, bound to the same user, instance and login and living `ide_session_ttl`. A link
token works once, on any replica (its jti is recorded as used in the database), so a leaked link cannot
mint sessions for the rest of its life. Each use is checked by the one access rule: the session rule
(control/sessions.py: account active, login not ended; in memory), then ownership
(control/access.py::grant) against the instance as it is now (looked up at most every
GRANT_CACHE_SECONDS per user and instance, so a busy IDE costs no database hop per request).

Revocation: an IDE session lives no longer than its login or its account. Logging out, a refresh
token reused (the family revoked), a password reset, a role change, disabling or deleting the account
end it, and a billing suspension ends every IDE session of the server: the change is stored, then the
`session.end` / `server.suspended` event reaches every replica (control/cluster.py), which forgets its
cached grants and cuts the matching IDE websockets at once (`HostedIde.revoke`); later requests are
refused.

Never answer with the IDE for a token of another kind, user or instance, and never log a token."""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import trio

from gateway.agent_client import forward_agent_result
from gateway.errors import ApiError
from gateway.forwarded import trusted_networks
from gateway.ide_proxy import IdeCredential, IdeGrant, IdeProxy, IdeRevocation
from storage import billing as store_billing
from storage import dev as store_dev
from storage import instances as store_instances
from storage import tokens as token_store
from storage import users
from storage.clock import isoformat, utcnow
from storage.db import Store

from .access import agent_target, grant, server_not_found
from .api import Ctx, CurrentUser, Route
from .auth.tokens import TokenKind
from .lifecycle import InstanceState
from .servers import ready_instance
from .services import Services

log = logging.getLogger("zlh.dev")

GRANT_CACHE_SECONDS = 2.0
GRANT_CACHE_MAX = 10_000
CODESERVER_TIMEOUT = 60.0  # a real code-server takes seconds to come up; the agent waits for it
LIVE_AFTER_INTERVALS = 3  # a replica silent for this many activity intervals no longer counts

IDE_TOKEN_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "token": {"type": "string"}, "expiresIn": {"type": "integer"},
    "url": {"type": "string", "description": "where the IDE lives: the tunnel path, or the hosted URL"},
    "openUrl": {"type": "string", "description": "url with the token: open it to start an IDE session"},
    "hosted": {"type": "boolean"}}}
ACTIVITY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "openWebsockets": {"type": "integer"}, "lastRequestAt": {"type": ["string", "null"]}}}


def dev_routes() -> list[Route]:
    base = "/api/dev/<int:server_id>"
    tags = ("dev",)
    ide_doc = ("Hosted IDE reverse proxy, HTTP and websocket: by path `/__ide/{id}/…` (prefix stripped; "
               "`/__ide/{id}` redirects to `/__ide/{id}/`) and by host `dev-{id}.<IDE_DOMAIN>` (any path). "
               "`?token=<IDE token>` sets the IDE cookie (HttpOnly, SameSite=Lax) and redirects to the same URL "
               "without it; later requests and websocket upgrades use the cookie. 401/403 in the error envelope "
               "for a missing, wrong, expired, other-user or other-instance credential, or one whose login "
               "ended (logout, password reset: its websockets are cut on every replica).")
    return [
        Route("POST", f"{base}/ide-token", ide_token,
              "A short-lived IDE token (bound to this user and dev container) and the URL to open",
              response=IDE_TOKEN_SCHEMA, tags=tags),
        Route("POST", f"{base}/codeserver/start", codeserver_start, "Start code-server in the dev container",
              tags=tags),
        Route("POST", f"{base}/codeserver/stop", codeserver_stop, "Stop code-server in the dev container",
              tags=tags),
        Route("POST", f"{base}/codeserver/restart", codeserver_restart, "Restart code-server in the dev container",
              tags=tags),
        Route("GET", f"{base}/ide/activity", ide_activity,
              "IDE connection activity (open websockets, last proxied request), as idle auto-stop sees it",
              response=ACTIVITY_SCHEMA, tags=tags),
        Route("GET", "/__ide/<int:server_id>/<path:rest>", None, "Hosted IDE (by path)", auth=None,
              data_plane=True, tags=tags, extra_doc={"description": ide_doc, "responses": {
                  "302": {"description": "token traded for the IDE cookie, or slash added"}}}),
    ]


# --- control routes -------------------------------------------------------------------------------

async def dev_instance(ctx: Ctx, server_id: int) -> Any:
    instance = await ready_instance(ctx, server_id)
    if instance.kind != "dev":
        raise ApiError(409, "NOT_A_DEV_CONTAINER", {"kind": instance.kind})
    return instance


def ide_url(services: Services, instance_id: int) -> tuple[str, bool]:
    """The tunnel path (under PUBLIC_URL when set), or with DEV_IDE_RETURN_HOSTED_URL the hosted URL."""
    settings = services.settings
    if not settings.dev_ide_return_hosted_url:
        return f"{settings.public_url.rstrip('/')}/__ide/{instance_id}/", False
    public = urlsplit(settings.public_url) if settings.public_url else None
    scheme = "http" if public is not None and public.scheme == "http" else "https"
    port = f":{public.port}" if public is not None and public.port else ""
    return f"{scheme}://dev-{instance_id}.{settings.ide_domain.strip('.')}{port}/", True


async def ide_token(ctx: Ctx, server_id: int) -> dict[str, Any]:
    instance = await dev_instance(ctx, server_id)
    if not instance.ide_port:
        raise ApiError(409, "IDE_NOT_CONFIGURED", {"state": instance.state})
    ttl = ctx.services.settings.ide_token_ttl
    token = ctx.services.tokens.issue(TokenKind.IDE, ctx.me.id, ttl, iid=instance.id, use="link",
                                      fam=ctx.me.family)
    url, hosted = ide_url(ctx.services, instance.id)
    return {"token": token, "expiresIn": ttl, "url": url, "openUrl": f"{url}?token={token}", "hosted": hosted}


async def _codeserver(ctx: Ctx, server_id: int, action: str) -> tuple[Any, int]:
    instance = await dev_instance(ctx, server_id)
    result = await ctx.services.agents.call(agent_target(instance), "POST", f"/dev/codeserver/{action}",
                                            timeout=CODESERVER_TIMEOUT)
    return forward_agent_result(result)


async def codeserver_start(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _codeserver(ctx, server_id, "start")


async def codeserver_stop(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _codeserver(ctx, server_id, "stop")


async def codeserver_restart(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _codeserver(ctx, server_id, "restart")


async def ide_activity(ctx: Ctx, server_id: int) -> dict[str, Any]:
    instance = await dev_instance(ctx, server_id)
    activity = await instance_ide_activity(ctx.services, instance.id)
    return {"openWebsockets": activity.open_websockets, "lastRequestAt": isoformat(activity.last_request_at)}


async def instance_ide_activity(services: Services, instance_id: int) -> store_dev.IdeActivity:
    """An instance's IDE activity over every live replica (what idle auto-stop decides on)."""
    live_after = utcnow() - timedelta(seconds=services.settings.ide_activity_interval * LIVE_AFTER_INTERVALS)
    return await services.store.run(store_dev.ide_activity, instance_id, live_after)


# --- the IDE proxy's rule -------------------------------------------------------------------------

@dataclass(frozen=True)
class _IdeView:
    """What one authorization needs to know about an account and an instance."""

    role: str
    owner_id: int | None  # None: no such instance
    kind: str = ""
    state: str = ""
    suspended: bool = False
    host: str | None = None
    ide_port: int | None = None


class IdeRules:
    """The IDE proxy's authorization rule (`authorize` is the proxy's IdeAuthorize)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._views: dict[tuple[int, int], tuple[float, _IdeView]] = {}
        self._sessions: dict[str, dict[str, Any]] = {}  # verified session tokens: a signature stays valid

    def forget(self) -> None:
        """Drop every cached view: the next request reads the account and instance again."""
        self._views.clear()

    async def _view(self, user_id: int, instance_id: int) -> _IdeView:
        key = (user_id, instance_id)
        now = time.monotonic()
        cached = self._views.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]

        def load() -> _IdeView:
            account = users.user_by_id(user_id)
            role = account.role if account is not None else "user"
            instance = store_instances.get_instance(instance_id)
            if instance is None:
                return _IdeView(role, None)
            return _IdeView(role, instance.owner_id, instance.kind, instance.state,
                            store_billing.is_suspended(instance.id), instance.agent_host, instance.ide_port)

        view = await self.services.store.read(load)
        if len(self._views) >= GRANT_CACHE_MAX:
            self._views.clear()
        self._views[key] = (now + GRANT_CACHE_SECONDS, view)
        return view

    def _verify(self, credential: IdeCredential) -> dict[str, Any]:
        """The token's claims (401 when bad or expired). A session cookie comes with every request of
        a busy IDE: its verified claims are kept, and only its expiry is checked again."""
        if credential.kind == "session":
            claims = self._sessions.get(credential.token)
            if claims is not None and claims["exp"] > utcnow().replace(tzinfo=UTC).timestamp():
                return claims
        claims = self.services.tokens.verify(TokenKind.IDE, credential.token)
        if credential.kind == "session":
            if len(self._sessions) >= GRANT_CACHE_MAX:
                self._sessions.clear()
            self._sessions[credential.token] = claims
        return claims

    async def authorize(self, credential: IdeCredential, instance_id: int) -> IdeGrant:
        claims = self._verify(credential)
        if claims.get("use") != credential.kind:
            raise ApiError(401, "INVALID_TOKEN", {"reason": "not an IDE " + credential.kind + " token"})
        if claims.get("iid") != instance_id:
            raise ApiError(403, "TOKEN_NOT_FOR_THIS_INSTANCE", {"id": instance_id})
        user_id, family = int(claims["sub"]), claims.get("fam")
        host, port = await self._allowed(user_id, instance_id, family)
        session, ttl = None, 0
        if credential.kind == "link":
            expires = datetime.fromtimestamp(claims["exp"], UTC).replace(tzinfo=None)
            if not await self.services.store.run(token_store.use_once, str(claims.get("jti")), expires):
                raise ApiError(401, "TOKEN_ALREADY_USED", {"reason": "an IDE link works once; ask for a new one"})
            ttl = self.services.settings.ide_session_ttl
            session = self.services.tokens.issue(TokenKind.IDE, user_id, ttl, iid=instance_id, use="session",
                                                 fam=family)
        return IdeGrant(host, port, instance_id, user_id, family, session, ttl)

    async def still_allowed(self, grant: IdeGrant) -> bool:
        """The rule again for an open websocket (its token may have expired since; that is fine)."""
        try:
            await self._allowed(grant.user_id, grant.instance_id, grant.family)
        except ApiError:
            return False
        return True

    async def _allowed(self, user_id: int, instance_id: int, family: str | None) -> tuple[str, int]:
        """Where the IDE listens, if the session, account and instance allow it now; ApiError saying
        why not."""
        self.services.sessions.check(user_id, family)
        view = await self._view(user_id, instance_id)
        grant(CurrentUser(user_id, view.role), view.owner_id, server_not_found(instance_id))
        if view.kind != "dev":
            raise ApiError(409, "NOT_A_DEV_CONTAINER", {"kind": view.kind})
        if view.state != InstanceState.READY.value:
            raise ApiError(409, "SERVER_NOT_READY", {"state": view.state})
        if view.suspended:
            raise ApiError(403, "SERVER_SUSPENDED", {"id": instance_id, "reason": "billing"})
        if not view.host or not view.ide_port:
            raise ApiError(409, "IDE_NOT_CONFIGURED")
        return view.host, view.ide_port


class HostedIde:
    """This replica's IDE proxy with this deployment's rule, activity record and cookie policy."""

    def __init__(self, services: Services) -> None:
        settings = services.settings
        self.rules = IdeRules(services)
        self.proxy = IdeProxy(services.upstream, self.rules.authorize, self.rules.still_allowed,
                              services.ide_activity, ide_domain=settings.ide_domain,
                              cookie_secure=settings.ide_cookie_is_secure,
                              cookie_secure_fixed=settings.ide_cookie_secure is not None,
                              trusted_proxies=trusted_networks(tuple(settings.trusted_proxies)),
                              public_scheme="https" if settings.ide_cookie_is_secure else "http")

    def revoke(self, revocation: IdeRevocation) -> int:
        """Apply a revocation here: no cached grant outlives it (a cut websocket's reconnect is
        refused) and the matching websockets are cut; how many."""
        self.rules.forget()
        return self.proxy.revoke(revocation)


# --- IDE activity ---------------------------------------------------------------------------------

class IdeActivityRecorder:
    """This replica's IDE activity per dev instance, kept in memory as it happens (no database hop
    per proxied request) and written every `interval` seconds as one batch. Instances with open
    websockets are re-reported every round, which is what keeps this replica's rows live."""

    def __init__(self, store: Store, *, interval: float, replica: str | None = None) -> None:
        self.store = store
        self.interval = interval
        self.replica = replica or secrets.token_hex(8)
        self._open: Counter[int] = Counter()
        self._last: dict[int, datetime] = {}
        self._dirty: set[int] = set()

    def request_seen(self, instance_id: int) -> None:
        self._last[instance_id] = utcnow()
        self._dirty.add(instance_id)

    def websocket_opened(self, instance_id: int) -> None:
        self._open[instance_id] += 1
        self.request_seen(instance_id)

    def websocket_closed(self, instance_id: int) -> None:
        self._open[instance_id] -= 1
        if self._open[instance_id] <= 0:
            del self._open[instance_id]
        self._dirty.add(instance_id)

    def _take(self) -> list[store_dev.ActivityReport]:
        ids = self._dirty | set(self._open)
        self._dirty = set()
        reports = [store_dev.ActivityReport(i, self._open.get(i, 0), self._last.get(i)) for i in sorted(ids)]
        for instance_id in ids - set(self._open):
            self._last.pop(instance_id, None)
        return reports

    async def flush(self) -> None:
        reports = self._take()
        if not reports:
            return
        try:
            await self.store.run(store_dev.record_ide_activity, self.replica, reports)
        except Exception:
            for report in reports:  # keep what was not written for the next round
                self._dirty.add(report.instance_id)
                if report.last_request_at is not None:
                    self._last.setdefault(report.instance_id, report.last_request_at)
            raise

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await trio.sleep(self.interval)
                try:
                    await self.flush()
                except Exception:
                    log.exception("could not record IDE activity")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self.flush()
                except Exception:
                    log.exception("could not record IDE activity at shutdown")
