"""The Stripe webhook: forged, stale and replayed deliveries change nothing; late or out-of-order events
resolve to what Stripe holds now."""

from __future__ import annotations

import json
import time

from stripe import WebhookSignature

from storage import billing as store_billing
from tests.billing.conftest import WEBHOOK_SECRET, BillingWorld, deliver, signed
from tests.conftest import Gateway


async def _checkout(world: BillingWorld, email: str, plan: str = "pro") -> tuple[dict, list[dict]]:
    session = await world.gateway.register(email)
    response = await world.client.post("/api/billing/checkout", json={"plan": plan}, headers=Gateway.bearer(session))
    return session, world.stripe.complete_checkout(response.json()["sessionId"])


async def test_forged_webhooks_are_400_and_change_nothing(world: BillingWorld) -> None:
    session, events = await _checkout(world, "forged@example.com")
    completed = events[-1]
    wrong_key = await deliver(world.client, completed, secret="whsec_" + "x" * 32)
    assert wrong_key.status_code == 400 and wrong_key.json()["error"] == "INVALID_SIGNATURE"
    payload, header = signed(completed)
    tampered = payload.replace('"complete"', '"completed!"')
    altered = await world.client.post("/api/billing/webhook", content=tampered,
                                      headers={"stripe-signature": header, "content-type": "application/json"})
    assert altered.status_code == 400 and altered.json()["error"] == "INVALID_SIGNATURE"
    unsigned = await world.client.post("/api/billing/webhook", content=payload,
                                       headers={"content-type": "application/json"})
    assert unsigned.status_code == 400
    # A valid signature over a reformatted body is still a different body: verification is on raw bytes.
    reformatted = json.dumps(json.loads(payload), indent=2)
    respaced = await world.client.post("/api/billing/webhook", content=reformatted,
                                       headers={"stripe-signature": header, "content-type": "application/json"})
    assert respaced.status_code == 400
    state = await world.state(session)
    assert state["plan"] == "free" and state["status"] == "none"
    assert not await world.store.run(store_billing.event_processed, completed["id"])
    # The genuine delivery still goes through afterwards.
    genuine = await deliver(world.client, completed)
    assert genuine.status_code == 200 and genuine.json()["applied"] is True
    assert (await world.state(session))["plan"] == "pro"


async def test_stale_webhook_is_400_and_changes_nothing(world: BillingWorld) -> None:
    session, events = await _checkout(world, "stale@example.com")
    old = int(time.time()) - world.gateway.settings.stripe_webhook_tolerance - 60
    response = await deliver(world.client, events[-1], timestamp=old)
    assert response.status_code == 400 and response.json()["error"] == "INVALID_SIGNATURE"
    assert "tolerance" in response.json()["details"]["reason"]
    assert (await world.state(session))["plan"] == "free"
    assert not await world.store.run(store_billing.event_processed, events[-1]["id"])


async def test_replayed_webhook_changes_nothing(world: BillingWorld) -> None:
    session, events = await _checkout(world, "replay@example.com")
    await world.deliver_all(events)
    assert (await world.state(session))["plan"] == "pro"
    # Stripe now holds something else, but no event says so: a replay must not pick it up.
    subscription_id = events[0]["data"]["object"]["id"]
    world.stripe.edit_silently(subscription_id, status="canceled")
    requests_before = len(world.stripe.requests)
    for event in events:
        replay = await deliver(world.client, event)
        assert replay.status_code == 200 and replay.json() == {"received": True, "duplicate": True}
    assert len(world.stripe.requests) == requests_before  # answered from the ledger, Stripe not asked
    state = await world.state(session)
    assert state["plan"] == "pro" and state["status"] == "active"


async def test_late_payment_failure_after_the_payment_resolves_to_active(world: BillingWorld) -> None:
    session, events = await _checkout(world, "late@example.com")
    await world.deliver_all(events)
    subscription_id = events[0]["data"]["object"]["id"]
    failed = world.stripe.fail_payment(subscription_id)
    paid = world.stripe.pay(subscription_id)
    await world.deliver_all(paid)
    await world.deliver_all(failed)  # arrives last, describes the past
    state = await world.state(session)
    assert state["status"] == "active" and state["paymentFailedAt"] is None and state["plan"] == "pro"


async def test_late_created_event_after_cancellation_stays_canceled(world: BillingWorld) -> None:
    session, events = await _checkout(world, "gone@example.com", plan="starter")
    subscription_id = events[0]["data"]["object"]["id"]
    world.stripe.edit_silently(subscription_id, cancel_at_period_end=True)
    deleted = world.stripe.end_period(subscription_id)
    await world.deliver_all(deleted)
    await world.deliver_all(events)  # the creation, delivered after the deletion
    state = await world.state(session)
    assert state["status"] == "canceled" and state["plan"] == "free"


async def test_events_of_unknown_customers_are_acknowledged_and_ignored(world: BillingWorld) -> None:
    event = {"id": "evt_unknown_1", "object": "event", "type": "customer.subscription.updated",
             "data": {"object": {"id": "sub_x", "object": "subscription", "customer": "cus_nobody"}}}
    response = await deliver(world.client, event)
    assert response.status_code == 200 and response.json()["applied"] is False
    again = await deliver(world.client, event)
    assert again.json()["duplicate"] is True


async def test_webhook_rejects_a_signed_body_that_is_not_an_event(world: BillingWorld) -> None:
    for payload in ("[1, 2, 3]", "not json", '{"object": "event"}'):
        header = WebhookSignature.generate_signature_header(payload, WEBHOOK_SECRET)
        response = await world.client.post("/api/billing/webhook", content=payload,
                                           headers={"stripe-signature": header, "content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"] == "INVALID_PAYLOAD", payload
