"""`POST /api/billing/webhook`: Stripe's events, verified and applied once.

Order of work, and why:
1. The raw body is read before anything parses it, and verified with `stripe.Webhook.construct_event`
   against the signing secret: a bad signature or a timestamp outside the tolerance is a 400 and
   nothing changes.
2. An event id already in the ledger is answered 200 at once (Stripe retries until it gets a 2xx).
3. The event names a customer; its data is only a hint. What is applied is the customer's subscription
   as Stripe holds it *now*, fetched again, so events arriving late or out of order resolve to the
   current state instead of rolling it back.
4. The ledger row and the state it caused are one transaction; the event id's unique key settles two
   deliveries racing on two replicas (the loser rolls back: a replay changes nothing).

It never trusts the JSON before the signature is checked and never writes SQL itself."""

from __future__ import annotations

import json
import logging
from typing import Any

from quart import request

from gateway.errors import ApiError
from storage import billing as store_billing
from storage import users

from ..api import Ctx
from .service import Billing
from .stripe_api import BillingProviderError

log = logging.getLogger("zlh.billing.webhook")

SUBSCRIPTION_EVENTS = frozenset({
    "checkout.session.completed",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
})


def verified_event(billing: Billing, payload: bytes, signature: str | None) -> dict[str, Any]:
    secret = billing.settings.stripe_webhook_secret
    if not secret:
        raise ApiError(503, "BILLING_NOT_CONFIGURED", {"reason": "no webhook signing secret"})
    import stripe  # here, not at the top: only a gateway with a webhook secret loads the library (~23 MB)

    try:
        stripe.Webhook.construct_event(payload, signature, secret,
                                       tolerance=billing.settings.stripe_webhook_tolerance)
    except stripe.SignatureVerificationError as exc:
        raise ApiError(400, "INVALID_SIGNATURE", {"reason": str(exc).split(".")[0]}) from exc
    except (ValueError, TypeError, AttributeError) as exc:
        # Signed but not a JSON object: the library fails while building the event from it.
        raise ApiError(400, "INVALID_PAYLOAD", {"reason": "body is not a JSON event"}) from exc
    event = json.loads(payload)
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not isinstance(event.get("type"), str):
        raise ApiError(400, "INVALID_PAYLOAD", {"reason": "not a Stripe event"})
    return event


def _user_hint(obj: dict[str, Any]) -> int | None:
    """The user id the gateway put on the object (Checkout's client_reference_id, or metadata)."""
    for value in (obj.get("client_reference_id"), (obj.get("metadata") or {}).get("zlh_user_id")):
        if isinstance(value, str) and value.isdigit():
            return int(value)
    return None


async def resolve_user(billing: Billing, obj: dict[str, Any]) -> int | None:
    """The local user of the event's customer. A customer unknown here is adopted only through the id
    the gateway itself sent to Stripe, and only for a user with no customer yet."""
    customer = obj.get("customer")
    if not isinstance(customer, str):
        return None
    account = await billing.store.run(store_billing.account_by_customer, customer)
    if account is not None:
        return int(account.user_id)
    hint = _user_hint(obj)
    if hint is None:
        return None

    def adopt() -> int | None:
        if users.user_by_id(hint) is None:
            return None
        return hint if store_billing.link_customer(hint, customer) == customer else None

    return await billing.store.run(adopt)


async def receive(ctx: Ctx) -> dict[str, Any]:
    billing: Billing = ctx.services.billing
    raw = await request.get_data(as_text=False)
    payload = raw if isinstance(raw, bytes) else raw.encode()
    event = verified_event(billing, payload, request.headers.get("stripe-signature"))
    event_id, event_type = event["id"], event["type"]
    if await billing.store.run(store_billing.event_processed, event_id):
        return {"received": True, "duplicate": True}
    obj = (event.get("data") or {}).get("object") or {}
    user_id = await resolve_user(billing, obj) if event_type in SUBSCRIPTION_EVENTS else None
    try:
        if user_id is None:
            await billing.store.run(store_billing.record_event, event_id, event_type)
            return {"received": True, "applied": False}
        if billing.stripe is None:
            raise ApiError(503, "BILLING_NOT_CONFIGURED", {"reason": "no Stripe secret key"})
        customer = obj["customer"]
        try:
            current = await billing.current_subscription(customer)
        except BillingProviderError as exc:
            # Not acknowledged: Stripe delivers the event again later.
            raise ApiError(502, "BILLING_PROVIDER_ERROR", {"message": exc.message}) from exc
        applied = await billing.apply_subscription(user_id, current, source=event_type,
                                                   event=(event_id, event_type))
    except store_billing.AlreadyProcessed:
        return {"received": True, "duplicate": True}
    log.info("stripe event applied", extra={"fields": {"event": event_id, "type": event_type,
                                                        "user": user_id, "plan": applied.plan}})
    return {"received": True, "applied": True}
