"""Ended sessions, known to every replica without a database query per request.

A token (access, console, IDE) is signed and lives until it expires; what can end it earlier is kept
here in memory: the logins (refresh-token families, the `fam` claim) that have ended — logout, a
refresh token reused, a password reset, a role change, a disabled or deleted account — and the
accounts that are disabled or deleted. `check(user, family)` is the session half of the one access
rule (control/api.py::authenticate, the console and the IDE proxy call it); the ownership half is
control/access.py::grant.

How it stays true on every replica: loaded from the database when the process starts (before it
serves), then kept current by the `session.end` fleet event that whatever ends a session publishes
after storing it (control/cluster.py::end_sessions: applied here at once, on the other replicas by
LISTEN/NOTIFY), and read again from the database every `resync_interval` seconds, which bounds how
long a missed event (a LISTEN connection down) can go unseen. A reload never undoes an event applied
while it ran: it reads again instead.

Never consult this for a login that has not ended in the last `horizon` seconds (the longest life of
a token that names a family): older ones are forgotten, their tokens have expired anyway."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

import trio

from gateway.errors import ApiError
from storage import tokens as token_store
from storage import users
from storage.clock import utcnow
from storage.db import Store

log = logging.getLogger("zlh.sessions")

SESSION_END = "session.end"  # the fleet event: {user, families, allLogins, account}
ACCOUNT_STATES = ("active", "disabled", "deleted")


def _ended_and_inactive(since: datetime) -> tuple[list[str], dict[int, str]]:
    return token_store.families_ended_since(since), users.inactive_accounts()


class Sessions:
    """This replica's view of which logins have ended and which accounts may no longer act."""

    def __init__(self, store: Store, *, horizon: float, resync_interval: float) -> None:
        self.store = store
        self.horizon = horizon
        self.resync_interval = resync_interval
        self._ended: dict[str, float] = {}  # family → monotonic time after which it can be forgotten
        self._inactive: dict[int, str] = {}  # user id → disabled | deleted
        self._changes = 0  # events applied so far: a reload that saw one land reads again
        self.loaded = False

    # --- the rule -----------------------------------------------------------------------------------

    def check(self, user_id: int, family: str | None) -> None:
        """Raise ApiError unless the account is active and the login `family` (if any) has not ended."""
        state = self._inactive.get(user_id)
        if state == "deleted":
            raise ApiError(401, "ACCOUNT_DELETED", {"reason": "this account was deleted"})
        if state == "disabled":
            raise ApiError(403, "ACCOUNT_DISABLED", {"reason": "this account is disabled"})
        if family is not None and family in self._ended:
            raise ApiError(401, "SESSION_REVOKED", {"reason": "this login has ended; log in again"},
                           headers={"WWW-Authenticate": "Bearer"})

    def allows(self, user_id: int, family: str | None) -> bool:
        try:
            self.check(user_id, family)
        except ApiError:
            return False
        return True

    # --- what feeds it ------------------------------------------------------------------------------

    def apply(self, event: dict[str, Any]) -> None:
        """A `session.end` event (from this replica or another)."""
        self._changes += 1
        forget_at = time.monotonic() + self.horizon
        for family in event.get("families") or ():
            self._ended[str(family)] = forget_at
        user, account = event.get("user"), event.get("account")
        if user is None or account not in ACCOUNT_STATES:
            return
        if account == "active":
            self._inactive.pop(int(user), None)
        else:
            self._inactive[int(user)] = str(account)

    async def load(self) -> None:
        """Read the ended logins and inactive accounts from the database."""
        for _attempt in range(5):
            seen = self._changes
            since = utcnow() - timedelta(seconds=self.horizon)
            families, inactive = await self.store.read(_ended_and_inactive, since)
            if self._changes != seen:
                continue  # an event landed meanwhile; what was read may predate it
            now = time.monotonic()
            kept = {family: until for family, until in self._ended.items() if until > now}
            forget_at = now + self.horizon
            kept.update({family: kept.get(family, forget_at) for family in families})
            self._ended, self._inactive = kept, inactive
            self.loaded = True
            return
        log.warning("sessions kept changing while being reloaded; trying again at the next resync")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load before the process serves, then resync periodically."""
        await self.load()
        task_status.started()
        while True:
            await trio.sleep(self.resync_interval)
            try:
                await self.load()
            except Exception:
                log.exception("could not reload ended sessions; keeping what is known")
