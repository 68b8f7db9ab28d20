"""The billing scheduler: reminders into the outbox and the mailbox, grace and downgrade deadlines,
suspension of servers over the plan's limits (never deletion), reconciliation of drift, admin exemption."""

from __future__ import annotations

import email
from datetime import timedelta
from pathlib import Path

from storage import billing as store_billing
from storage import clock, users
from storage import instances as store_instances
from storage.models import AuditLog
from tests.billing.conftest import BillingWorld
from tests.billing.test_billing_flow import add_servers
from tests.conftest import Gateway


def mailed_subjects(world: BillingWorld, to: str) -> list[str]:
    outbox = Path(world.gateway.settings.data_dir) / "outbox"
    subjects = []
    for path in sorted(outbox.glob("*.eml")) if outbox.exists() else []:
        message = email.message_from_bytes(path.read_bytes())
        if message["To"] == to:
            subjects.append(str(message["Subject"]))
    return subjects


def live_instances(user_id: int) -> list[int]:
    return [i.id for i in store_instances.list_instances(user_id)]


def suspended_ids(user_id: int) -> list[int]:
    return sorted(s.instance_id for s in store_billing.owned_servers(user_id) if s.suspended)


async def test_payment_failure_reminds_then_grace_then_suspends_and_payment_lifts(world: BillingWorld) -> None:
    session = await world.gateway.register("late-payer@example.com")
    user_id = session["user"]["id"]
    subscription_id = await world.subscribe(session, "starter")
    servers = await add_servers(world, user_id, 2)  # starter covers 2 game servers, free covers 1
    assert (await world.scheduler.step()).suspended == {}

    await world.deliver_all(world.stripe.fail_payment(subscription_id))
    state = await world.state(session)
    assert state["status"] == "past_due" and state["plan"] == "starter" and state["paymentFailedAt"]
    assert state["graceEndsAt"] and not state["lapsed"]

    report = await world.scheduler.step()
    assert any(key.startswith("payment_failed:") for key in report.queued) and report.delivered >= 1
    assert mailed_subjects(world, "late-payer@example.com") == ["Your ZLH payment failed"]
    again = await world.scheduler.step()  # the same reminder is not sent twice
    assert not any(key.startswith("payment_failed:") for key in again.queued)
    assert mailed_subjects(world, "late-payer@example.com") == ["Your ZLH payment failed"]

    clock.offset = timedelta(days=6)  # still within the 7-day grace
    session = await world.login(session)
    report = await world.scheduler.step()
    assert report.suspended == {} and (await world.state(session))["plan"] == "starter"

    clock.offset = timedelta(days=7, hours=1)
    report = await world.scheduler.step()
    session = await world.login(session)
    assert report.plan_changes[user_id] == ("starter", "free")
    assert report.suspended == {user_id: [servers[1]]}  # the newest beyond the limit; the oldest stays
    state = await world.state(session)
    assert state["plan"] == "free" and state["lapsed"] and state["usage"]["suspendedServers"] == 1
    assert await world.store.run(live_instances, user_id) == servers  # stopped, never deleted
    assert "ZLH servers stopped" in mailed_subjects(world, "late-payer@example.com")
    assert (await world.scheduler.step()).suspended == {}  # already suspended: nothing new

    await world.deliver_all(world.stripe.pay(subscription_id))
    assert (await world.state(session))["plan"] == "starter"
    report = await world.scheduler.step()
    assert report.lifted == {user_id: [servers[1]]}
    assert await world.store.run(suspended_ids, user_id) == []


async def test_downgrade_to_free_keeps_the_plan_until_period_end_then_suspends(world: BillingWorld) -> None:
    session = await world.gateway.register("leaving@example.com")
    user_id = session["user"]["id"]
    subscription_id = await world.subscribe(session, "pro")
    servers = await add_servers(world, user_id, 3)
    response = await world.client.post("/api/billing/downgrade", json={}, headers=Gateway.bearer(session))
    assert response.status_code == 200, response.text
    state = response.json()
    assert state["plan"] == "pro" and state["pendingPlan"] == "free" and state["cancelAtPeriodEnd"]
    assert state["pendingAt"] == state["currentPeriodEnd"]
    assert world.stripe.objects["subscription"][subscription_id]["cancel_at_period_end"] is True
    assert (await world.scheduler.step()).suspended == {}

    clock.offset = timedelta(days=28)  # within the notice before the period ends
    session = await world.login(session)
    report = await world.scheduler.step()
    assert any(key.startswith("period_ending:") for key in report.queued)
    assert "Your ZLH plan changes soon" in mailed_subjects(world, "leaving@example.com")
    assert (await world.state(session))["plan"] == "pro"

    await world.deliver_all(world.stripe.end_period(subscription_id))  # Stripe cancels at period end
    clock.offset = timedelta(days=30, hours=1)
    report = await world.scheduler.step()
    session = await world.login(session)
    assert report.plan_changes[user_id] == ("pro", "free")
    assert report.suspended == {user_id: servers[1:]}
    state = await world.state(session)
    assert state["plan"] == "free" and state["status"] == "canceled" and state["pendingPlan"] is None
    assert await world.store.run(live_instances, user_id) == servers


async def test_downgrade_to_a_cheaper_paid_plan_swaps_the_price_without_proration(world: BillingWorld) -> None:
    session = await world.gateway.register("cheaper@example.com")
    user_id = session["user"]["id"]
    subscription_id = await world.subscribe(session, "pro")
    invoices_before = len(world.stripe.objects["invoice"])
    response = await world.client.post("/api/billing/downgrade", json={"plan": "starter"},
                                       headers=Gateway.bearer(session))
    assert response.status_code == 200, response.text
    assert response.json()["plan"] == "pro" and response.json()["pendingPlan"] == "starter"
    subscription = world.stripe.objects["subscription"][subscription_id]
    assert subscription["items"]["data"][0]["price"]["nickname"] == "starter"
    assert not subscription["cancel_at_period_end"]
    assert len(world.stripe.objects["invoice"]) == invoices_before  # nothing charged or credited now
    await world.deliver_all(world.stripe.events[-1:])  # the update webhook does not end the paid period
    assert (await world.state(session))["plan"] == "pro"
    clock.offset = timedelta(days=31)
    report = await world.scheduler.step()
    assert report.plan_changes[user_id] == ("pro", "starter")
    session = await world.login(session)
    assert (await world.state(session))["plan"] == "starter"


async def test_upgrade_cancels_a_pending_downgrade(world: BillingWorld) -> None:
    session = await world.gateway.register("changed-mind@example.com")
    headers = Gateway.bearer(session)
    subscription_id = await world.subscribe(session, "starter")
    await world.client.post("/api/billing/downgrade", json={}, headers=headers)
    response = await world.client.post("/api/billing/upgrade", json={"plan": "pro"}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["plan"] == "pro" and response.json()["pendingPlan"] is None
    assert world.stripe.objects["subscription"][subscription_id]["cancel_at_period_end"] is False


async def test_reconciliation_repairs_a_drifted_subscription(world: BillingWorld) -> None:
    session = await world.gateway.register("drift@example.com")
    user_id = session["user"]["id"]
    subscription_id = await world.subscribe(session, "pro")
    assert (await world.scheduler.step()).drifted == []
    # Changed in Stripe; the webhook never arrived.
    starter = world.gateway.settings.plans[1]["stripe_price_id"]
    world.stripe.edit_silently(subscription_id, price=starter)
    report = await world.scheduler.step()
    assert report.reconciled and report.drifted == [user_id]
    assert report.plan_changes[user_id] == ("pro", "starter")
    assert (await world.state(session))["plan"] == "starter"
    world.stripe.edit_silently(subscription_id, status="canceled")
    report = await world.scheduler.step()
    assert report.drifted == [user_id] and (await world.state(session))["status"] == "canceled"
    assert (await world.state(session))["plan"] == "free"

    def drift_log() -> list[dict]:
        return [row.details for row in AuditLog.select().where(AuditLog.action == "billing.drift")]

    logged = await world.store.run(drift_log)
    assert [entry["stripe"]["status"] for entry in logged] == ["active", "canceled"]
    assert logged[0]["local"]["priceId"] != logged[0]["stripe"]["priceId"]
    assert (await world.scheduler.step()).drifted == []  # repaired: nothing left to fix


async def test_admin_is_billing_exempt(world: BillingWorld) -> None:
    session = await world.gateway.register("boss@example.com")
    user_id = session["user"]["id"]
    await world.store.run(users.set_role, user_id, "admin")
    login = await world.client.post("/api/auth/login", json={"email": "boss@example.com", "password": "password123"})
    headers = Gateway.bearer(login.json())
    state = (await world.client.get("/api/billing", headers=headers)).json()
    assert state["exempt"] is True and state["limits"] is None
    for path, body in (("/api/billing/checkout", {"plan": "pro"}), ("/api/billing/upgrade", {"plan": "pro"}),
                       ("/api/billing/downgrade", {})):
        response = await world.client.post(path, json=body, headers=headers)
        assert response.status_code == 409 and response.json()["error"] == "BILLING_EXEMPT", path
    # Far beyond the free plan, with a billing account in a lapsed state: never suspended, never reminded.
    await add_servers(world, user_id, 4)
    await world.store.run(store_billing.ensure_account, user_id)
    await world.store.run(lambda: store_billing.BillingAccount.update(
        status="past_due", delinquent_since=clock.utcnow() - timedelta(days=30)).execute())
    report = await world.scheduler.step()
    assert report.suspended == {} and report.queued == []
    assert mailed_subjects(world, "boss@example.com") == []
    assert not any(server.suspended for server in await world.store.run(store_billing.owned_servers, user_id))


async def test_the_app_runs_the_scheduler_as_a_service(world: BillingWorld) -> None:
    ready = (await world.client.get("/ready")).json()
    assert "billing" in ready["services"]


async def test_reminders_are_retried_when_delivery_fails(world: BillingWorld) -> None:
    session = await world.gateway.register("retry@example.com")
    subscription_id = await world.subscribe(session, "starter")
    await world.deliver_all(world.stripe.fail_payment(subscription_id))
    outbox = Path(world.gateway.settings.data_dir) / "outbox"
    outbox.parent.mkdir(parents=True, exist_ok=True)
    outbox.write_text("not a directory")  # delivery fails
    report = await world.scheduler.step()
    assert report.delivered == 0 and report.queued
    pending = await world.store.run(store_billing.notifications, session["user"]["id"])
    assert pending[0].sent_at is None and pending[0].last_error
    outbox.unlink()
    assert (await world.scheduler.step()).delivered == 1
    assert mailed_subjects(world, "retry@example.com") == ["Your ZLH payment failed"]


async def test_suspension_goes_through_the_server_stopper_and_is_retried_when_it_fails(world: BillingWorld) -> None:
    """The contract of the SuspendServers hook (services.extra["suspend_servers"]): called with the
    owner, the servers the plan no longer covers and the reason; a failed stop is not recorded, so the
    next round asks again."""
    session = await world.gateway.register("stopper@example.com")
    user_id = session["user"]["id"]
    subscription_id = await world.subscribe(session, "starter")
    servers = await add_servers(world, user_id, 2)
    calls: list[tuple[int, list[int], str]] = []

    async def stop_servers(owner: int, instance_ids: list[int], reason: str) -> None:
        calls.append((owner, instance_ids, reason))
        if len(calls) == 1:
            raise OSError("agent unreachable")

    world.scheduler.billing.extra["suspend_servers"] = stop_servers
    await world.deliver_all(world.stripe.fail_payment(subscription_id))
    clock.offset = timedelta(days=8)
    first = await world.scheduler.step()
    assert first.suspended == {} and await world.store.run(suspended_ids, user_id) == []
    second = await world.scheduler.step()
    assert second.suspended == {user_id: [servers[1]]}
    assert calls == [(user_id, [servers[1]], "plan_limit")] * 2
    assert await world.store.run(suspended_ids, user_id) == [servers[1]]
