"""Billing end to end: the real gateway on a real socket, the official stripe library talking to the
local Stripe-compatible server, webhooks signed by the stripe library."""

from __future__ import annotations

from typing import Any

from control.instances import CreateInstance, check_plan_limits
from gateway.errors import ApiError
from storage import instances as store_instances
from storage import users
from tests.billing.conftest import BillingWorld
from tests.conftest import Gateway


def add_server(user_id: int, kind: str = "game", name: str = "srv") -> int:
    vmid = store_instances.next_free_vmid()
    return store_instances.create_instance(vmid=vmid, owner=user_id, kind=kind, name=f"{name}{vmid}",
                                           engine_type="minecraft", provider="local", state="ready").id


async def add_servers(world: BillingWorld, user_id: int, count: int, kind: str = "game") -> list[int]:
    return [await world.store.run(add_server, user_id, kind) for _ in range(count)]


def would_allow(user_id: int, kind: str) -> bool:
    user = users.user_by_id(user_id)
    plan = users.plan_by_name(user.plan)
    counts = {k: store_instances.count_by_kind(user_id, k) for k in ("game", "dev")}
    body = CreateInstance.model_validate({"kind": kind, "name": "next", "engineType": "minecraft"})
    try:
        check_plan_limits(user, plan, body, counts)
    except ApiError:
        return False
    return True


async def test_checkout_then_webhook_activates_the_plan_and_raises_limits(world: BillingWorld) -> None:
    session = await world.gateway.register("payer@example.com")
    user_id = session["user"]["id"]
    await add_servers(world, user_id, 1)
    before = await world.state(session)
    assert before["plan"] == "free" and before["status"] == "none"
    assert before["limits"]["maxGameServers"] == 1 and before["usage"]["gameServers"] == 1
    assert not await world.store.run(would_allow, user_id, "game")
    over = await world.client.post("/api/instances", headers=Gateway.bearer(session),
                                   json={"kind": "game", "name": "second", "engineType": "minecraft"})
    assert over.status_code == 403 and over.json()["error"] == "PLAN_LIMIT"

    response = await world.client.post("/api/billing/checkout", json={"plan": "pro"}, headers=Gateway.bearer(session))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["url"].startswith("https://checkout.stripe.test/") and body["plan"] == "pro"
    checkout_session = world.stripe.objects["checkout.session"][body["sessionId"]]
    assert checkout_session["client_reference_id"] == str(user_id)
    assert checkout_session["success_url"] == "https://portal.zlh.test/billing?checkout=success"
    # Nothing is granted before Stripe says it was paid.
    assert (await world.state(session))["plan"] == "free"

    await world.deliver_all(world.stripe.complete_checkout(body["sessionId"]))
    after = await world.state(session)
    assert after["plan"] == "pro" and after["status"] == "active" and after["currentPeriodEnd"]
    assert after["limits"]["maxGameServers"] == 5
    assert await world.store.run(would_allow, user_id, "game")


async def test_checkout_events_in_reverse_order_reach_the_same_state(world: BillingWorld) -> None:
    session = await world.gateway.register("reverse@example.com")
    response = await world.client.post("/api/billing/checkout", json={"plan": "starter"},
                                       headers=Gateway.bearer(session))
    events = world.stripe.complete_checkout(response.json()["sessionId"])
    await world.deliver_all(list(reversed(events)))
    state = await world.state(session)
    assert state["plan"] == "starter" and state["status"] == "active"


async def test_checkout_refuses_a_second_subscription_and_unknown_or_free_plans(world: BillingWorld) -> None:
    session = await world.gateway.register("twice@example.com")
    headers = Gateway.bearer(session)
    free = await world.client.post("/api/billing/checkout", json={"plan": "free"}, headers=headers)
    assert free.status_code == 422 and free.json()["error"] == "PLAN_NOT_PURCHASABLE"
    bad = await world.client.post("/api/billing/checkout", json={"plan": 7}, headers=headers)
    assert bad.status_code == 422 and bad.json()["error"] == "VALIDATION_FAILED"
    await world.subscribe(session, "starter")
    again = await world.client.post("/api/billing/checkout", json={"plan": "pro"}, headers=headers)
    assert again.status_code == 409 and again.json()["error"] == "ALREADY_SUBSCRIBED"
    # One Stripe customer per user, reused.
    assert len(world.stripe.objects["customer"]) == 1


async def test_upgrade_is_immediate_and_prorated(world: BillingWorld) -> None:
    session = await world.gateway.register("up@example.com")
    headers = Gateway.bearer(session)
    subscription_id = await world.subscribe(session, "starter")
    invoices_before = len(world.stripe.objects["invoice"])
    response = await world.client.post("/api/billing/upgrade", json={"plan": "pro"}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["plan"] == "pro" and response.json()["limits"]["maxGameServers"] == 5
    subscription = world.stripe.objects["subscription"][subscription_id]
    assert subscription["items"]["data"][0]["price"]["id"] == world.gateway.settings.plans[2]["stripe_price_id"]
    proration = [i for i in world.stripe.objects["invoice"].values() if i["billing_reason"] == "subscription_update"]
    assert len(world.stripe.objects["invoice"]) == invoices_before + 1
    assert proration and proration[0]["amount_due"] > 0 and proration[0]["status"] == "paid"
    # The webhooks that follow find the same state.
    await world.deliver_all(world.stripe.events[-2:])
    assert (await world.state(session))["plan"] == "pro"


async def test_upgrade_and_downgrade_refuse_the_wrong_direction(world: BillingWorld) -> None:
    session = await world.gateway.register("dir@example.com")
    headers = Gateway.bearer(session)
    none = await world.client.post("/api/billing/upgrade", json={"plan": "pro"}, headers=headers)
    assert none.status_code == 409 and none.json()["error"] == "NO_SUBSCRIPTION"
    await world.subscribe(session, "starter")
    down_as_up = await world.client.post("/api/billing/upgrade", json={"plan": "starter"}, headers=headers)
    assert down_as_up.status_code == 409 and down_as_up.json()["error"] == "NOT_AN_UPGRADE"
    up_as_down = await world.client.post("/api/billing/downgrade", json={"plan": "pro"}, headers=headers)
    assert up_as_down.status_code == 409 and up_as_down.json()["error"] == "NOT_A_DOWNGRADE"


async def test_portal_answers_a_stripe_session_url(world: BillingWorld) -> None:
    session = await world.gateway.register("portal@example.com")
    headers = Gateway.bearer(session)
    early = await world.client.post("/api/billing/portal", headers=headers)
    assert early.status_code == 409 and early.json()["error"] == "NO_BILLING_ACCOUNT"
    await world.subscribe(session, "starter")
    response = await world.client.post("/api/billing/portal", headers=headers)
    assert response.status_code == 200, response.text
    url = response.json()["url"]
    assert url.startswith("https://billing.stripe.test/p/session/")
    portal_session = world.stripe.objects["billing_portal.session"][response.json()["sessionId"]]
    assert portal_session["return_url"] == "https://portal.zlh.test/billing"
    assert portal_session["customer"] in {c["id"] for c in world.stripe.objects["customer"].values()}


async def test_billing_routes_need_a_user(world: BillingWorld) -> None:
    for method, path in (("GET", "/api/billing"), ("POST", "/api/billing/checkout"), ("POST", "/api/billing/portal"),
                         ("POST", "/api/billing/upgrade"), ("POST", "/api/billing/downgrade")):
        response = await world.client.request(method, path, json={"plan": "pro"})
        assert response.status_code == 401, path


async def test_openapi_describes_every_billing_route(world: BillingWorld) -> None:
    document = (await world.client.get("/openapi.json")).json()
    paths: dict[str, Any] = document["paths"]
    assert paths["/api/billing"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    for path in ("/api/billing/checkout", "/api/billing/upgrade", "/api/billing/downgrade"):
        op = paths[path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]  # hoisted into components
        assert "plan" in document["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
        assert op["responses"]["200"]["content"]["application/json"]["schema"]
    assert paths["/api/billing/portal"]["post"]["responses"]["200"]["content"]
    webhook = paths["/api/billing/webhook"]["post"]
    assert "security" not in webhook
    assert any(p["name"] == "Stripe-Signature" for p in webhook["parameters"])
