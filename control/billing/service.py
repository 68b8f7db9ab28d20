"""Billing, assembled: the plan catalog, the Stripe adapter and the one way Stripe's subscription state
becomes local state (`apply_mirror`: mirror the subscription, fold in the grace and downgrade facts,
set the user's effective plan, log drift). Routes, the webhook and the scheduler all write through
`apply_mirror`, so there is one path from "what Stripe holds" to "what the user may run".

It never answers HTTP and never parses webhooks; suspension of servers goes through the
`SuspendServers` hook, whose implementation (stop the servers, close their consoles with the
suspension close code) lives with the servers, not here."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from storage import billing as store_billing
from storage import users
from storage.billing import SubscriptionMirror
from storage.clock import isoformat, utcnow
from storage.db import Store

from ..config import Settings
from .entitlement import (
    NO_SUBSCRIPTION,
    SUBSCRIBED_STATUSES,
    Catalog,
    Standing,
    effective_plan,
    lapsed,
    next_standing,
)
from .stripe_api import StripeApi, subscription_mirror

log = logging.getLogger("zlh.billing")

# `await suspend_servers(user_id, instance_ids, reason)`: stop those servers and close their consoles
# with the suspension close code; never delete anything. Registered by the assembly as
# services.extra["suspend_servers"].
SuspendServers = Callable[[int, list[int], str], Awaitable[None]]

KEEP = object()  # apply_mirror: leave the kept plan as it is


def pick_current(subscriptions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Of one customer's subscriptions, the one that decides the plan: the newest that is still
    subscribed (active, trialing, past due, unpaid), else the newest of any status."""
    if not subscriptions:
        return None
    newest_first = sorted(subscriptions, key=lambda s: (s.get("created") or 0, s["id"]), reverse=True)
    for subscription in newest_first:
        if subscription.get("status") in SUBSCRIBED_STATUSES:
            return subscription
    return newest_first[0]


@dataclass(frozen=True)
class Applied:
    user_id: int
    plan: str
    previous_plan: str
    drifted: bool
    standing: Standing


@dataclass
class Billing:
    settings: Settings
    store: Store
    catalog: Catalog
    stripe: StripeApi | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, store: Store, extra: dict[str, Any]) -> Billing:
        stripe = None
        if settings.stripe_secret_key:
            stripe = StripeApi(settings.stripe_secret_key, api_base=settings.stripe_api_base,
                               timeout=settings.stripe_timeout)
        return cls(settings, store, Catalog(settings.plans, settings.default_plan), stripe, extra)

    @property
    def grace(self) -> timedelta:
        return timedelta(seconds=self.settings.billing_grace_period)

    @property
    def suspend_servers(self) -> SuspendServers | None:
        return self.extra.get("suspend_servers")

    def return_url(self, outcome: str) -> str:
        base = self.settings.billing_return_url or f"{self.settings.public_url.rstrip('/')}/billing"
        return f"{base}?checkout={outcome}" if outcome else base

    def paid_plan(self, subscription: dict[str, Any]) -> str:
        """The plan a subscription's price pays for."""
        return self.catalog.plan_for_price(subscription_mirror(subscription).price_id) or self.catalog.default_plan

    async def aclose(self) -> None:
        if self.stripe is not None:
            await self.stripe.aclose()

    async def current_subscription(self, customer_id: str) -> dict[str, Any] | None:
        """What Stripe holds now for this customer (never what an event said it held then)."""
        assert self.stripe is not None
        return pick_current(await self.stripe.customer_subscriptions(customer_id))

    async def apply_subscription(self, user_id: int, subscription: dict[str, Any] | None, *,
                                 source: str, event: tuple[str, str] | None = None,
                                 kept: Any = KEEP) -> Applied:
        mirror = subscription_mirror(subscription) if subscription else NO_SUBSCRIPTION
        return await self.apply_mirror(user_id, mirror, source=source, event=event, kept=kept)

    async def apply_mirror(self, user_id: int, mirror: SubscriptionMirror, *, source: str,
                           event: tuple[str, str] | None = None, kept: Any = KEEP) -> Applied:
        """One transaction: claim the webhook event (a replay raises AlreadyProcessed and changes
        nothing), store Stripe's subscription, fold the standing forward, set the effective plan."""
        now = utcnow()

        def write() -> Applied:
            if event is not None:
                store_billing.record_event(*event)
            row = store_billing.ensure_account(user_id)
            before = store_billing.mirror_of(row)
            previous = Standing(before, row.delinquent_since, row.kept_plan, row.kept_until)
            if kept is not KEEP:
                previous = replace(previous, kept_plan=kept[0], kept_until=kept[1])
            standing = next_standing(previous, mirror, now)
            store_billing.store_subscription(user_id, mirror, delinquent_since=standing.delinquent_since,
                                             kept_plan=standing.kept_plan, kept_until=standing.kept_until)
            plan = effective_plan(standing, self.catalog, now, self.grace)
            previous_plan = store_billing.set_user_plan(user_id, plan)
            drifted = source == "reconcile" and before != mirror
            if drifted:
                users.audit("billing.drift", None, f"user:{user_id}", local=_mirror_json(before),
                            stripe=_mirror_json(mirror))
            if previous_plan != plan:
                users.audit("billing.plan_changed", None, f"user:{user_id}", source=source,
                            before=previous_plan, after=plan)
            return Applied(user_id, plan, previous_plan, drifted, standing)

        applied = await self.store.run(write)
        if applied.drifted:
            log.warning("billing drift repaired", extra={"fields": {"user": user_id, "plan": applied.plan}})
        return applied

    def state_json(self, user: Any, row: Any, plan: Any, usage: dict[str, int], now: datetime) -> dict[str, Any]:
        """The Portal's view of a user's billing: plan, status, period, what changes when, limits, usage."""
        exempt = user.role == "admin"
        standing = (Standing(store_billing.mirror_of(row), row.delinquent_since, row.kept_plan, row.kept_until)
                    if row is not None else Standing(NO_SUBSCRIPTION, None, None, None))
        mirror = standing.mirror
        pending_plan = None
        if standing.kept_plan and standing.kept_until and now < standing.kept_until:
            pending_plan = (self.catalog.default_plan if mirror.cancel_at_period_end
                            else self.catalog.plan_for_price(mirror.price_id) or self.catalog.default_plan)
        elif mirror.cancel_at_period_end and mirror.status in SUBSCRIBED_STATUSES:
            pending_plan = self.catalog.default_plan
        grace_ends = standing.delinquent_since + self.grace if standing.delinquent_since else None
        return {
            "plan": user.plan,
            "exempt": exempt,
            "status": mirror.status,
            "subscriptionId": mirror.subscription_id,
            "currentPeriodEnd": isoformat(mirror.current_period_end),
            "cancelAtPeriodEnd": mirror.cancel_at_period_end,
            "pendingPlan": pending_plan,
            "pendingAt": isoformat((standing.kept_until or mirror.current_period_end) if pending_plan else None),
            "paymentFailedAt": isoformat(standing.delinquent_since),
            "graceEndsAt": isoformat(grace_ends),
            "lapsed": lapsed(standing, now, self.grace),
            "limits": None if exempt or plan is None else {
                "maxGameServers": plan.max_game_servers, "maxDevServers": plan.max_dev_servers,
                "maxCpuCores": plan.max_cpu_cores, "maxMemoryMb": plan.max_memory_mb,
                "maxDiskGb": plan.max_disk_gb, "maxUploadBytes": plan.max_upload_bytes},
            "usage": {"gameServers": usage.get("game", 0), "devServers": usage.get("dev", 0),
                      "suspendedServers": usage.get("suspended", 0)},
        }


def _mirror_json(mirror: SubscriptionMirror) -> dict[str, Any]:
    return {"subscriptionId": mirror.subscription_id, "status": mirror.status, "priceId": mirror.price_id,
            "currentPeriodEnd": isoformat(mirror.current_period_end),
            "cancelAtPeriodEnd": mirror.cancel_at_period_end}
