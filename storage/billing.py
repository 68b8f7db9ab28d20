"""Billing state: each user's Stripe account mirror, the processed-webhook ledger, the notification
outbox and server suspensions — the tables and their reads and writes (synchronous; run them through
Store.run).

What Stripe holds is the truth for subscriptions: `BillingAccount` is a mirror written from Stripe's
answers, plus the few facts only the gateway knows (when a downgrade keeps the old plan until, when
the account first fell behind on payment). Nothing here talks to Stripe or decides a plan."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import peewee

from .clock import utcnow
from .models import BaseModel, Instance, JSONField, User


class BillingAccount(BaseModel):
    user = peewee.ForeignKeyField(User, primary_key=True, on_delete="CASCADE", backref="billing")
    user_id: int  # the key column peewee adds beside `user`
    customer_id = peewee.CharField(null=True, unique=True, max_length=255)
    subscription_id = peewee.CharField(null=True, index=True, max_length=255)
    status = peewee.CharField(max_length=32, default="none")  # Stripe's subscription status, or "none"
    price_id = peewee.CharField(null=True, max_length=255)
    current_period_end = peewee.DateTimeField(null=True)
    cancel_at_period_end = peewee.BooleanField(default=False)
    # A downgrade takes effect at period end: the plan paid for stays until then.
    kept_plan = peewee.CharField(null=True, max_length=64)
    kept_until = peewee.DateTimeField(null=True)
    # When the subscription was first seen behind on payment; the grace period runs from here.
    delinquent_since = peewee.DateTimeField(null=True)
    synced_at = peewee.DateTimeField(null=True)
    updated_at = peewee.DateTimeField(default=utcnow)


class StripeEvent(BaseModel):
    """Every webhook event applied, by Stripe's event id: the primary key makes a replay a no-op."""

    id = peewee.CharField(primary_key=True, max_length=255)
    type = peewee.CharField(max_length=128)
    processed_at = peewee.DateTimeField(default=utcnow)


class Notification(BaseModel):
    """The outbox: a reminder is a record first and is delivered (mailed) later; `dedupe_key` makes
    the same reminder, decided twice or by two replicas, one record."""

    kind = peewee.CharField(max_length=64)
    user = peewee.ForeignKeyField(User, on_delete="CASCADE", backref="notifications")
    user_id: int  # the key column peewee adds beside `user`
    payload = JSONField(default=dict)
    dedupe_key = peewee.CharField(unique=True, max_length=255)
    created_at = peewee.DateTimeField(default=utcnow, index=True)
    sent_at = peewee.DateTimeField(null=True)
    attempts = peewee.IntegerField(default=0)
    last_error = peewee.TextField(null=True)


class Suspension(BaseModel):
    """A server stopped because its owner's plan no longer covers it. Never a deletion: the row says
    why and since when; `lifted_at` is set when the plan covers it again."""

    instance_id = peewee.IntegerField(primary_key=True)
    user = peewee.ForeignKeyField(User, on_delete="CASCADE", backref="suspensions")
    user_id: int  # the key column peewee adds beside `user`
    reason = peewee.CharField(max_length=64)
    suspended_at = peewee.DateTimeField(default=utcnow)
    lifted_at = peewee.DateTimeField(null=True)


TABLES: list[type[BaseModel]] = [BillingAccount, StripeEvent, Notification, Suspension]


class AlreadyProcessed(Exception):
    """The webhook event was applied before (a replay): the transaction must roll back."""


# --- accounts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubscriptionMirror:
    """What Stripe holds for one customer's subscription, in the gateway's terms."""

    subscription_id: str | None
    status: str
    price_id: str | None
    current_period_end: datetime | None
    cancel_at_period_end: bool


def account(user_id: int) -> BillingAccount | None:
    return BillingAccount.get_or_none(BillingAccount.user == user_id)


def account_by_customer(customer_id: str) -> BillingAccount | None:
    return BillingAccount.get_or_none(BillingAccount.customer_id == customer_id)


def accounts() -> list[BillingAccount]:
    return list(BillingAccount.select().order_by(BillingAccount.user))


def ensure_account(user_id: int) -> BillingAccount:
    found = account(user_id)
    if found is not None:
        return found
    try:
        with BillingAccount._meta.database.atomic():
            return BillingAccount.create(user=user_id)
    except peewee.IntegrityError:
        return BillingAccount.get(BillingAccount.user == user_id)


def link_customer(user_id: int, customer_id: str) -> str:
    """Record the user's Stripe customer unless one is recorded already; return the one that is."""
    ensure_account(user_id)
    (BillingAccount.update(customer_id=customer_id, updated_at=utcnow())
     .where((BillingAccount.user == user_id) & BillingAccount.customer_id.is_null()).execute())
    return str(BillingAccount.get(BillingAccount.user == user_id).customer_id)


def mirror_of(row: BillingAccount) -> SubscriptionMirror:
    return SubscriptionMirror(row.subscription_id, row.status, row.price_id, row.current_period_end,
                              row.cancel_at_period_end)


def store_subscription(user_id: int, mirror: SubscriptionMirror, *, delinquent_since: datetime | None,
                       kept_plan: str | None, kept_until: datetime | None) -> None:
    now = utcnow()
    (BillingAccount.update(subscription_id=mirror.subscription_id, status=mirror.status,
                           price_id=mirror.price_id, current_period_end=mirror.current_period_end,
                           cancel_at_period_end=mirror.cancel_at_period_end, delinquent_since=delinquent_since,
                           kept_plan=kept_plan, kept_until=kept_until, synced_at=now, updated_at=now)
     .where(BillingAccount.user == user_id).execute())


def set_user_plan(user_id: int, plan: str) -> str:
    """Set the user's effective plan; return the plan it replaced."""
    user = User.get(User.id == user_id)
    if user.plan != plan:
        User.update(plan=plan).where(User.id == user_id).execute()
    return user.plan


# --- webhook ledger ---------------------------------------------------------------------------


def event_processed(event_id: str) -> bool:
    return StripeEvent.select().where(StripeEvent.id == event_id).exists()


def record_event(event_id: str, event_type: str) -> None:
    """Claim the event inside the caller's transaction; raise AlreadyProcessed on a replay (the unique
    key settles a race between two deliveries, on any replica)."""
    try:
        with StripeEvent._meta.database.atomic():
            StripeEvent.create(id=event_id, type=event_type, processed_at=utcnow())
    except peewee.IntegrityError as exc:
        raise AlreadyProcessed(event_id) from exc


# --- notification outbox ----------------------------------------------------------------------


def queue_notification(user_id: int, kind: str, dedupe_key: str, payload: dict[str, Any]) -> bool:
    """Add a reminder to the outbox once; False if the same reminder is already there."""
    try:
        with Notification._meta.database.atomic():
            Notification.create(user=user_id, kind=kind, dedupe_key=dedupe_key, payload=payload,
                                created_at=utcnow())
        return True
    except peewee.IntegrityError:
        return False


@dataclass(frozen=True)
class PendingNotification:
    id: int
    kind: str
    email: str
    payload: dict[str, Any]


def claim_unsent(limit: int = 100) -> list[PendingNotification]:
    """Take unsent notifications for delivery (marked sent now, so no other replica sends them too;
    `release` puts one back when delivery fails)."""
    now = utcnow()
    rows = (Notification.select(Notification, User.email).join(User)
            .where(Notification.sent_at.is_null()).order_by(Notification.id).limit(limit))
    claimed = []
    for row in rows:
        taken = (Notification.update(sent_at=now, attempts=Notification.attempts + 1)
                 .where((Notification.id == row.id) & Notification.sent_at.is_null()).execute())
        if taken:
            claimed.append(PendingNotification(row.id, row.kind, row.user.email, row.payload or {}))
    return claimed


def release(notification_id: int, error: str) -> None:
    Notification.update(sent_at=None, last_error=error[:2000]).where(Notification.id == notification_id).execute()


def notifications(user_id: int | None = None) -> list[Notification]:
    query = Notification.select().order_by(Notification.id)
    if user_id is not None:
        query = query.where(Notification.user == user_id)
    return list(query)


# --- servers and suspensions ------------------------------------------------------------------


@dataclass(frozen=True)
class OwnedServer:
    instance_id: int
    kind: str
    state: str
    suspended: bool


def owned_servers(user_id: int) -> list[OwnedServer]:
    """The user's servers that count against plan limits, oldest first."""
    suspended = {s.instance_id for s in Suspension.select(Suspension.instance_id)
                 .where((Suspension.user == user_id) & Suspension.lifted_at.is_null())}
    rows = (Instance.select(Instance.id, Instance.kind, Instance.state)
            .where((Instance.owner == user_id) & Instance.state.not_in(["failed", "deleting", "deleted"]))
            .order_by(Instance.created_at, Instance.id))
    return [OwnedServer(r.id, r.kind, r.state, r.id in suspended) for r in rows]


def suspend(user_id: int, instance_ids: list[int], reason: str) -> None:
    now = utcnow()
    for instance_id in instance_ids:
        updated = (Suspension.update(user=user_id, reason=reason, suspended_at=now, lifted_at=None)
                   .where(Suspension.instance_id == instance_id).execute())
        if not updated:
            Suspension.create(instance_id=instance_id, user=user_id, reason=reason, suspended_at=now)


def lift(instance_ids: list[int]) -> None:
    if instance_ids:
        (Suspension.update(lifted_at=utcnow())
         .where(Suspension.instance_id.in_(instance_ids) & Suspension.lifted_at.is_null()).execute())


def is_suspended(instance_id: int) -> bool:
    return Suspension.select().where((Suspension.instance_id == instance_id)
                                     & Suspension.lifted_at.is_null()).exists()


def count_servers(user_id: int) -> dict[str, int]:
    counts = {"game": 0, "dev": 0}
    for server in owned_servers(user_id):
        counts[server.kind] = counts.get(server.kind, 0) + 1
    return counts
