"""What a user is entitled to, decided from facts alone (sans-I/O: no Stripe, no database, no clock of
its own): the plan catalog, the effective plan of a billing account, and which servers a plan no
longer covers. The webhook handler, the routes and the scheduler all decide through here, so a plan is
computed one way everywhere.

Standing of an account, from Stripe's subscription status and the gateway's own two facts:

    Stripe status            standing                                   effective plan
    active | trialing        paid                                       the plan of the price
    past_due | unpaid        delinquent, within grace                   the plan of the price
                             delinquent, grace over (lapsed)            the default plan
    anything else / none     unsubscribed                               the default plan
    (any, after a downgrade) until the paid period ends                 the plan kept from before

A downgrade never takes a plan away before the end of the period already paid for; a failed payment
takes it away only after the grace period. Servers beyond the effective plan's limits are then
suspended (oldest servers are kept), never deleted."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from storage.billing import OwnedServer, SubscriptionMirror

PAID_STATUSES = frozenset({"active", "trialing"})
DELINQUENT_STATUSES = frozenset({"past_due", "unpaid"})
SUBSCRIBED_STATUSES = PAID_STATUSES | DELINQUENT_STATUSES
NO_SUBSCRIPTION = SubscriptionMirror(None, "none", None, None, False)


class Catalog:
    """The configured plans in the operator's order (cheapest first) and their Stripe prices."""

    def __init__(self, plans: list[dict[str, Any]], default_plan: str) -> None:
        self.plans = {plan["name"]: plan for plan in plans}
        self.order = [plan["name"] for plan in plans]
        self.default_plan = default_plan

    def rank(self, name: str) -> int:
        return self.order.index(name) if name in self.order else -1

    def price_of(self, name: str) -> str | None:
        plan = self.plans.get(name)
        return plan.get("stripe_price_id") if plan else None

    def plan_for_price(self, price_id: str | None) -> str | None:
        for name, plan in self.plans.items():
            if price_id and plan.get("stripe_price_id") == price_id:
                return name
        return None

    def limits(self, name: str) -> dict[str, int]:
        plan = self.plans.get(name) or self.plans.get(self.default_plan) or {}
        return {"game": int(plan.get("max_game_servers", 0)), "dev": int(plan.get("max_dev_servers", 0))}


@dataclass(frozen=True)
class Standing:
    """An account's facts after applying what Stripe holds now."""

    mirror: SubscriptionMirror
    delinquent_since: datetime | None
    kept_plan: str | None
    kept_until: datetime | None


def next_standing(previous: Standing, mirror: SubscriptionMirror, now: datetime) -> Standing:
    """Fold Stripe's current subscription into the account: the grace clock starts the first time the
    subscription is seen behind and stops when it is not; a kept plan lapses at its date."""
    if mirror.status in DELINQUENT_STATUSES:
        delinquent_since = previous.delinquent_since or now
    else:
        delinquent_since = None
    kept_plan, kept_until = previous.kept_plan, previous.kept_until
    if kept_until is not None and now >= kept_until:
        kept_plan, kept_until = None, None
    return Standing(mirror, delinquent_since, kept_plan, kept_until)


def lapsed(standing: Standing, now: datetime, grace: timedelta) -> bool:
    return standing.delinquent_since is not None and now >= standing.delinquent_since + grace


def effective_plan(standing: Standing, catalog: Catalog, now: datetime, grace: timedelta) -> str:
    if lapsed(standing, now, grace):
        return catalog.default_plan
    if standing.kept_plan and standing.kept_until and now < standing.kept_until:
        return standing.kept_plan
    if standing.mirror.status in SUBSCRIBED_STATUSES:
        return catalog.plan_for_price(standing.mirror.price_id) or catalog.default_plan
    return catalog.default_plan


@dataclass(frozen=True)
class Coverage:
    suspend: list[int]
    lift: list[int]


def coverage(servers: list[OwnedServer], limits: dict[str, int]) -> Coverage:
    """Per kind, the oldest `limit` servers are covered by the plan; the rest are suspended. A
    suspended server the plan covers again has its suspension lifted (it stays stopped)."""
    suspend: list[int] = []
    lift: list[int] = []
    for kind in sorted({server.kind for server in servers}):
        allowed = limits.get(kind, 0)
        of_kind = [server for server in servers if server.kind == kind]
        for position, server in enumerate(of_kind):
            covered = position < allowed
            if not covered and not server.suspended:
                suspend.append(server.instance_id)
            elif covered and server.suspended:
                lift.append(server.instance_id)
    return Coverage(suspend, lift)
