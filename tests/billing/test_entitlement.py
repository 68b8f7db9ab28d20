"""The entitlement rules on their own (no network, no database): effective plan by Stripe status,
grace and kept plans; which servers a plan covers."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from control.billing.entitlement import (
    NO_SUBSCRIPTION,
    Catalog,
    Standing,
    coverage,
    effective_plan,
    next_standing,
)
from storage.billing import OwnedServer, SubscriptionMirror

NOW = datetime(2026, 1, 10, 12, 0)
GRACE = timedelta(days=7)
CATALOG = Catalog([
    {"name": "free", "max_game_servers": 1, "max_dev_servers": 1, "stripe_price_id": None},
    {"name": "starter", "max_game_servers": 2, "max_dev_servers": 1, "stripe_price_id": "price_s"},
    {"name": "pro", "max_game_servers": 5, "max_dev_servers": 3, "stripe_price_id": "price_p"},
], "free")


def mirror(status: str, price: str = "price_p", cancel: bool = False) -> SubscriptionMirror:
    return SubscriptionMirror("sub_1", status, price, NOW + timedelta(days=20), cancel)


@pytest.mark.parametrize(("status", "plan"), [
    ("active", "pro"), ("trialing", "pro"), ("past_due", "pro"), ("unpaid", "pro"),
    ("canceled", "free"), ("incomplete", "free"), ("incomplete_expired", "free"), ("paused", "free"),
])
def test_effective_plan_follows_stripe_status(status: str, plan: str) -> None:
    standing = next_standing(Standing(NO_SUBSCRIPTION, None, None, None), mirror(status), NOW)
    assert effective_plan(standing, CATALOG, NOW, GRACE) == plan


def test_grace_starts_once_and_lapses_after_the_grace_period() -> None:
    first = next_standing(Standing(mirror("active"), None, None, None), mirror("past_due"), NOW)
    later = next_standing(first, mirror("past_due"), NOW + timedelta(days=3))
    assert first.delinquent_since == later.delinquent_since == NOW
    assert effective_plan(later, CATALOG, NOW + timedelta(days=6), GRACE) == "pro"
    assert effective_plan(later, CATALOG, NOW + GRACE, GRACE) == "free"
    paid = next_standing(later, mirror("active"), NOW + timedelta(days=8))
    assert paid.delinquent_since is None
    assert effective_plan(paid, CATALOG, NOW + timedelta(days=8), GRACE) == "pro"


def test_a_kept_plan_holds_until_its_date_then_lapses() -> None:
    until = NOW + timedelta(days=20)
    standing = next_standing(Standing(mirror("active"), None, "pro", until), mirror("active", "price_s"), NOW)
    assert effective_plan(standing, CATALOG, NOW, GRACE) == "pro"
    after = next_standing(standing, mirror("canceled"), until)
    assert after.kept_plan is None and effective_plan(after, CATALOG, until, GRACE) == "free"


def test_an_unknown_price_grants_only_the_default_plan() -> None:
    standing = next_standing(Standing(NO_SUBSCRIPTION, None, None, None), mirror("active", "price_other"), NOW)
    assert effective_plan(standing, CATALOG, NOW, GRACE) == "free"


def test_coverage_keeps_the_oldest_servers_per_kind_and_lifts_what_fits_again() -> None:
    servers = [OwnedServer(1, "game", "ready", False), OwnedServer(2, "dev", "ready", False),
               OwnedServer(3, "game", "ready", True), OwnedServer(4, "game", "ready", False),
               OwnedServer(5, "dev", "ready", False)]
    decision = coverage(servers, CATALOG.limits("free"))
    assert decision.suspend == [5, 4] and decision.lift == []
    decision = coverage(servers, CATALOG.limits("pro"))
    assert decision.suspend == [] and decision.lift == [3]
