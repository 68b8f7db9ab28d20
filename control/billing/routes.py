"""Billing routes: current billing state, Checkout for a plan, immediate prorated upgrade, downgrade at
period end, the customer portal, and the Stripe webhook (control/billing/webhook.py). `routes()` lists
them for the one route list in control/app.py.

Admins are billing-exempt: they need no checkout and have no limits, so the paying routes answer them
409 BILLING_EXEMPT. A plan change is applied from Stripe's answer at once; the webhook that follows
finds the same state. Stripe failures answer 502 BILLING_PROVIDER_ERROR; nothing local changes."""

from __future__ import annotations

from typing import Annotated, Any

import pydantic

from gateway.errors import ApiError
from storage import billing as store_billing
from storage import users
from storage.clock import utcnow

from ..api import Body, Ctx, Route
from .entitlement import DELINQUENT_STATUSES, PAID_STATUSES, SUBSCRIBED_STATUSES
from .service import Billing
from .stripe_api import BillingProviderError, StripeApi, subscription_mirror
from .webhook import receive

PlanName = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=64)]


class PlanChoice(Body):
    plan: PlanName


class DowngradeChoice(Body):
    plan: PlanName | None = None  # default: the free (default) plan


BILLING_STATE_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "plan": {"type": "string"}, "exempt": {"type": "boolean"},
    "status": {"type": "string", "description": "Stripe's subscription status, or none"},
    "subscriptionId": {"type": ["string", "null"]},
    "currentPeriodEnd": {"type": ["string", "null"], "format": "date-time"},
    "cancelAtPeriodEnd": {"type": "boolean"},
    "pendingPlan": {"type": ["string", "null"], "description": "the plan from pendingAt on (after a downgrade)"},
    "pendingAt": {"type": ["string", "null"], "format": "date-time"},
    "paymentFailedAt": {"type": ["string", "null"], "format": "date-time"},
    "graceEndsAt": {"type": ["string", "null"], "format": "date-time"},
    "lapsed": {"type": "boolean"},
    "limits": {"type": ["object", "null"], "description": "null for billing-exempt admins (no limits)"},
    "usage": {"type": "object", "properties": {"gameServers": {"type": "integer"}, "devServers": {"type": "integer"},
                                               "suspendedServers": {"type": "integer"}}}}}
URL_SCHEMA: dict[str, Any] = {"type": "object", "required": ["url"], "properties": {
    "url": {"type": "string", "format": "uri"}, "sessionId": {"type": "string"}, "plan": {"type": "string"}}}
WEBHOOK_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "received": {"type": "boolean"}, "applied": {"type": "boolean"}, "duplicate": {"type": "boolean"}}}
WEBHOOK_DOC: dict[str, Any] = {
    "parameters": [{"name": "Stripe-Signature", "in": "header", "required": True, "schema": {"type": "string"}}],
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "description": "A Stripe event, verified over the raw bytes"}}}},
    "description": "Bad signature or stale timestamp: 400 and nothing changes. An event id seen before: "
                   "200 with duplicate=true and nothing changes.",
}


def billing_of(ctx: Ctx) -> Billing:
    return ctx.services.billing


def stripe_of(billing: Billing) -> StripeApi:
    if billing.stripe is None:
        raise ApiError(503, "BILLING_NOT_CONFIGURED", {"reason": "no Stripe secret key"})
    return billing.stripe


def provider_error(exc: BillingProviderError) -> ApiError:
    return ApiError(502, "BILLING_PROVIDER_ERROR", {"message": exc.message, "code": exc.code})


async def paying_user(ctx: Ctx) -> tuple[Any, Any]:
    """The user and their billing account row; admins are exempt from every paying route."""

    def load() -> tuple[Any, Any]:
        user = users.user_by_id(ctx.me.id)
        return user, (store_billing.account(user.id) if user is not None else None)

    user, row = await ctx.services.store.run(load)
    if user is None:
        raise ApiError(401, "UNAUTHORIZED")
    if user.role == "admin":
        raise ApiError(409, "BILLING_EXEMPT", {"reason": "admins need no subscription and have no limits"})
    return user, row


async def billing_state(ctx: Ctx) -> dict[str, Any]:
    billing = billing_of(ctx)

    def load() -> tuple[Any, Any, Any, dict[str, int]]:
        user = users.user_by_id(ctx.me.id)
        if user is None:
            raise ApiError(401, "UNAUTHORIZED")
        servers = store_billing.owned_servers(user.id)
        usage = {"game": sum(s.kind == "game" for s in servers), "dev": sum(s.kind == "dev" for s in servers),
                 "suspended": sum(s.suspended for s in servers)}
        return user, store_billing.account(user.id), users.plan_by_name(user.plan), usage

    user, row, plan, usage = await ctx.services.store.run(load)
    return billing.state_json(user, row, plan, usage, utcnow())


async def checkout(ctx: Ctx) -> dict[str, Any]:
    billing = billing_of(ctx)
    stripe = stripe_of(billing)
    user, row = await paying_user(ctx)
    plan = ctx.body.plan
    price = billing.catalog.price_of(plan)
    if price is None:
        raise ApiError(422, "PLAN_NOT_PURCHASABLE", {"plan": plan})
    if row is not None and row.status in SUBSCRIBED_STATUSES:
        raise ApiError(409, "ALREADY_SUBSCRIBED", {"status": row.status, "hint": "use upgrade or downgrade"})
    try:
        customer: str | None = row.customer_id if row is not None else None
        if not customer:
            created = await stripe.create_customer(user.email, user.id)
            customer = await ctx.services.store.run(store_billing.link_customer, user.id, created)
        session = await stripe.checkout_session(customer_id=customer, price_id=price, user_id=user.id, plan=plan,
                                                success_url=billing.return_url("success"),
                                                cancel_url=billing.return_url("cancel"))
    except BillingProviderError as exc:
        raise provider_error(exc) from exc
    return {"url": session["url"], "sessionId": session["id"], "plan": plan}


async def _subscribed(billing: Billing, row: Any) -> dict[str, Any]:
    """The user's current subscription as Stripe holds it now; 409 unless it is paid up."""
    if row is None or not row.customer_id:
        raise ApiError(409, "NO_SUBSCRIPTION", {"hint": "start with checkout"})
    subscription = await billing.current_subscription(row.customer_id)
    status = subscription.get("status") if subscription else None
    if status in DELINQUENT_STATUSES:
        raise ApiError(409, "PAYMENT_PAST_DUE", {"status": status, "hint": "settle the payment in the portal"})
    if subscription is None or status not in PAID_STATUSES:
        raise ApiError(409, "NO_SUBSCRIPTION", {"status": status, "hint": "start with checkout"})
    return subscription


async def upgrade(ctx: Ctx) -> dict[str, Any]:
    """Immediate and prorated: Stripe invoices the difference for the rest of the period now."""
    billing = billing_of(ctx)
    stripe = stripe_of(billing)
    user, row = await paying_user(ctx)
    target = ctx.body.plan
    price = billing.catalog.price_of(target)
    if price is None:
        raise ApiError(422, "PLAN_NOT_PURCHASABLE", {"plan": target})
    try:
        subscription = await _subscribed(billing, row)
        paid_plan = billing.paid_plan(subscription)
        if billing.catalog.rank(target) <= billing.catalog.rank(paid_plan):
            raise ApiError(409, "NOT_AN_UPGRADE", {"current": paid_plan, "requested": target})
        updated = await stripe.change_price(subscription, price, prorate_now=True)
    except BillingProviderError as exc:
        raise provider_error(exc) from exc
    await billing.apply_subscription(user.id, updated, source="upgrade", kept=(None, None))
    return await billing_state(ctx)


async def downgrade(ctx: Ctx) -> dict[str, Any]:
    """At period end: the plan paid for stays until then. To the free plan the subscription is set to
    cancel at period end; to a cheaper paid plan its price is swapped without proration, so the next
    invoice bills the new price."""
    billing = billing_of(ctx)
    stripe = stripe_of(billing)
    user, row = await paying_user(ctx)
    target = ctx.body.plan or billing.catalog.default_plan
    if target not in billing.catalog.plans:
        raise ApiError(422, "UNKNOWN_PLAN", {"plan": target})
    price = billing.catalog.price_of(target)
    try:
        subscription = await _subscribed(billing, row)
        paid_plan = billing.paid_plan(subscription)
        if billing.catalog.rank(target) >= billing.catalog.rank(paid_plan):
            raise ApiError(409, "NOT_A_DOWNGRADE", {"current": paid_plan, "requested": target})
        if price is None:
            updated = await stripe.cancel_at_period_end(subscription["id"])
        else:
            updated = await stripe.change_price(subscription, price, prorate_now=False)
    except BillingProviderError as exc:
        raise provider_error(exc) from exc
    period_end = subscription_mirror(subscription).current_period_end
    kept_plan = row.kept_plan if row is not None and row.kept_plan else user.plan
    kept_until = row.kept_until if row is not None and row.kept_until else period_end
    await billing.apply_subscription(user.id, updated, source="downgrade", kept=(kept_plan, kept_until))
    return await billing_state(ctx)


async def portal(ctx: Ctx) -> dict[str, Any]:
    billing = billing_of(ctx)
    stripe = stripe_of(billing)
    row = await ctx.services.store.run(store_billing.account, ctx.me.id)
    if row is None or not row.customer_id:
        raise ApiError(409, "NO_BILLING_ACCOUNT", {"hint": "start with checkout"})
    try:
        session = await stripe.portal_session(customer_id=row.customer_id, return_url=billing.return_url(""))
    except BillingProviderError as exc:
        raise provider_error(exc) from exc
    return {"url": session["url"], "sessionId": session["id"]}


def routes() -> list[Route]:
    tags = ("billing",)
    return [
        Route("GET", "/api/billing", billing_state,
              "Billing state: plan, subscription status, period end, pending change, limits and current usage",
              response=BILLING_STATE_SCHEMA, tags=tags),
        Route("POST", "/api/billing/checkout", checkout, "Start Stripe Checkout for a plan; answers its URL",
              body=PlanChoice, response=URL_SCHEMA, tags=tags),
        Route("POST", "/api/billing/upgrade", upgrade,
              "Upgrade now, prorated (the difference is invoiced at once); limits rise at once",
              body=PlanChoice, response=BILLING_STATE_SCHEMA, tags=tags),
        Route("POST", "/api/billing/downgrade", downgrade,
              "Downgrade at period end (default: to the free plan); the paid plan stays until then",
              body=DowngradeChoice, response=BILLING_STATE_SCHEMA, tags=tags),
        Route("POST", "/api/billing/portal", portal, "A Stripe customer portal session; answers its URL",
              response=URL_SCHEMA, tags=tags),
        Route("POST", "/api/billing/webhook", receive,
              "Stripe webhook: signature verified over the raw body, applied once per event id",
              auth=None, body=None, raw_body=True, response=WEBHOOK_SCHEMA, tags=tags, extra_doc=WEBHOOK_DOC),
    ]
