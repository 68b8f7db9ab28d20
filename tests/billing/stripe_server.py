"""A compact Stripe-API-compatible server for the billing tests, served for real (Hypercorn on
127.0.0.1, port 0) and reached by the official `stripe` library through `base_addresses`.

It speaks Stripe's wire format for the endpoints billing calls: form-encoded requests with bracket
notation (`items[0][price]=…`), bearer secret-key auth, `{"object": …}` JSON answers in the current
API's shapes (billing period on the subscription item, invoice → subscription under `parent`),
cursor-paged lists (`limit`, `starting_after`, `has_more`), `Idempotency-Key` replay and error bodies
`{"error": {"type", "code", "message", "param"}}`.

What Stripe does on its own — a customer finishing Checkout, a card declined on renewal, a period
ending — is driven by the tests through methods on `FakeStripe` (`complete_checkout`, `fail_payment`,
`pay`, `end_period`, `edit_silently`). Each records the events real Stripe would send; the tests
deliver them (signed by the stripe library) in whatever order they need."""

from __future__ import annotations

import copy
import itertools
import json
import re
import secrets
import time
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

PERIOD = 30 * 24 * 3600
API_VERSION = "2026-10-28.endive"


class StripeApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.body = status, {"error": {"type": type_, "code": code, "message": message, "param": param}}


def decode_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's bracket notation back into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        path = re.findall(r"[^\[\]]+", key)
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return _listify(root)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {k: _listify(v) for k, v in node.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


def _flag(value: Any) -> bool:
    return str(value).lower() == "true"


class FakeStripe:
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.objects: dict[str, dict[str, dict[str, Any]]] = {
            kind: {} for kind in ("customer", "price", "product", "checkout.session", "billing_portal.session",
                                  "subscription", "invoice")}
        self.events: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self._idempotent: dict[str, tuple[int, dict[str, Any]]] = {}
        self._seq = itertools.count(1)
        self.url = ""

    # --- object helpers -------------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        return f"{prefix}_test_{next(self._seq):04d}{secrets.token_hex(4)}"

    def _get(self, kind: str, object_id: str, param: str = "id") -> dict[str, Any]:
        found = self.objects[kind].get(object_id)
        if found is None:
            raise StripeApiError(404, f"No such {kind.split('.')[-1]}: '{object_id}'", code="resource_missing",
                                 param=param)
        return found

    def _emit(self, event_type: str, obj: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"object": copy.deepcopy(obj)}
        if previous is not None:
            data["previous_attributes"] = previous
        event = {"id": self._id("evt"), "object": "event", "api_version": API_VERSION, "created": int(time.time()),
                 "data": data, "livemode": False, "pending_webhooks": 1,
                 "request": {"id": None, "idempotency_key": None}, "type": event_type}
        self.events.append(event)
        return event

    def create_price(self, unit_amount: int, nickname: str) -> str:
        product = {"id": self._id("prod"), "object": "product", "name": nickname, "active": True}
        self.objects["product"][product["id"]] = product
        price = {"id": self._id("price"), "object": "price", "active": True, "currency": "usd",
                 "nickname": nickname, "product": product["id"], "type": "recurring", "unit_amount": unit_amount,
                 "recurring": {"interval": "month", "interval_count": 1}, "livemode": False}
        self.objects["price"][price["id"]] = price
        return price["id"]

    def _invoice(self, subscription: dict[str, Any], *, amount: int, paid: bool, reason: str) -> dict[str, Any]:
        item = subscription["items"]["data"][0]
        invoice = {
            "id": self._id("in"), "object": "invoice", "customer": subscription["customer"],
            "status": "paid" if paid else "open", "amount_due": amount, "amount_paid": amount if paid else 0,
            "amount_remaining": 0 if paid else amount, "attempt_count": 1, "attempted": True,
            "billing_reason": reason, "currency": "usd", "created": int(time.time()),
            "period_start": item["current_period_start"], "period_end": item["current_period_end"],
            "parent": {"type": "subscription_details", "quote_details": None,
                       "subscription_details": {"subscription": subscription["id"],
                                                "metadata": subscription["metadata"]}},
            "livemode": False,
        }
        self.objects["invoice"][invoice["id"]] = invoice
        subscription["latest_invoice"] = invoice["id"]
        return invoice

    # --- what Stripe does on its own (driven by tests) ----------------------------------------

    def complete_checkout(self, session_id: str) -> list[dict[str, Any]]:
        """The customer pays on the hosted Checkout page."""
        session = self._get("checkout.session", session_id)
        line = session["line_items"][0]
        price = self._get("price", line["price"])
        now = int(time.time())
        subscription = {
            "id": self._id("sub"), "object": "subscription", "customer": session["customer"], "status": "active",
            "cancel_at_period_end": False, "cancel_at": None, "canceled_at": None, "ended_at": None,
            "created": now, "start_date": now, "billing_cycle_anchor": now, "collection_method": "charge_automatically",
            "metadata": dict((session.get("subscription_data") or {}).get("metadata") or {}),
            "items": {"object": "list", "data": [], "has_more": False, "url": ""}, "latest_invoice": None,
            "livemode": False, "schedule": None,
        }
        subscription["items"]["url"] = f"/v1/subscription_items?subscription={subscription['id']}"
        subscription["items"]["data"].append({
            "id": self._id("si"), "object": "subscription_item", "price": copy.deepcopy(price),
            "quantity": int(line.get("quantity", 1)), "subscription": subscription["id"], "created": now,
            "current_period_start": now, "current_period_end": now + PERIOD})
        self.objects["subscription"][subscription["id"]] = subscription
        invoice = self._invoice(subscription, amount=price["unit_amount"], paid=True, reason="subscription_create")
        session.update(status="complete", payment_status="paid", subscription=subscription["id"])
        return [self._emit("customer.subscription.created", subscription),
                self._emit("invoice.paid", invoice),
                self._emit("checkout.session.completed", session)]

    def fail_payment(self, subscription_id: str) -> list[dict[str, Any]]:
        """The renewal charge is declined: the subscription goes past due."""
        subscription = self._get("subscription", subscription_id)
        item = subscription["items"]["data"][0]
        invoice = self._invoice(subscription, amount=item["price"]["unit_amount"], paid=False,
                                reason="subscription_cycle")
        previous = {"status": subscription["status"]}
        subscription["status"] = "past_due"
        return [self._emit("invoice.payment_failed", invoice),
                self._emit("customer.subscription.updated", subscription, previous)]

    def pay(self, subscription_id: str) -> list[dict[str, Any]]:
        """The open invoice is paid (card updated in the portal)."""
        subscription = self._get("subscription", subscription_id)
        invoice = self._get("invoice", subscription["latest_invoice"])
        invoice.update(status="paid", amount_paid=invoice["amount_due"], amount_remaining=0)
        previous = {"status": subscription["status"]}
        subscription["status"] = "active"
        return [self._emit("invoice.paid", invoice), self._emit("customer.subscription.updated", subscription, previous)]

    def end_period(self, subscription_id: str) -> list[dict[str, Any]]:
        """The billing period ends: a subscription set to cancel is canceled, any other renews."""
        subscription = self._get("subscription", subscription_id)
        item = subscription["items"]["data"][0]
        if subscription["cancel_at_period_end"]:
            now = int(time.time())
            subscription.update(status="canceled", ended_at=now, canceled_at=now)
            return [self._emit("customer.subscription.deleted", subscription)]
        item["current_period_start"] = item["current_period_end"]
        item["current_period_end"] += PERIOD
        invoice = self._invoice(subscription, amount=item["price"]["unit_amount"], paid=True,
                                reason="subscription_cycle")
        return [self._emit("invoice.paid", invoice), self._emit("customer.subscription.updated", subscription)]

    def edit_silently(self, subscription_id: str, **changes: Any) -> None:
        """A change in Stripe whose webhook never arrives (drift): status, price, cancel flag."""
        subscription = self._get("subscription", subscription_id)
        if "price" in changes:
            subscription["items"]["data"][0]["price"] = copy.deepcopy(self._get("price", changes.pop("price")))
        subscription.update(changes)

    def subscriptions_of(self, customer_id: str) -> list[dict[str, Any]]:
        return [s for s in self.objects["subscription"].values() if s["customer"] == customer_id]

    # --- the HTTP API ---------------------------------------------------------------------------

    async def handle(self, method: str, path: str, query: dict[str, Any], form: dict[str, Any]) -> tuple[int, Any]:
        self.requests.append((method, path))
        routes: list[tuple[str, str, Any]] = [
            ("POST", r"/v1/customers", self.create_customer),
            ("GET", r"/v1/customers/(?P<id>[^/]+)", lambda p, i: self._get("customer", i)),
            ("POST", r"/v1/prices", self.create_price_api),
            ("GET", r"/v1/prices/(?P<id>[^/]+)", lambda p, i: self._get("price", i)),
            ("POST", r"/v1/checkout/sessions", self.create_checkout_session),
            ("GET", r"/v1/checkout/sessions/(?P<id>[^/]+)", lambda p, i: self._get("checkout.session", i)),
            ("POST", r"/v1/billing_portal/sessions", self.create_portal_session),
            ("GET", r"/v1/subscriptions", self.list_subscriptions),
            ("GET", r"/v1/subscriptions/(?P<id>[^/]+)", lambda p, i: self._get("subscription", i)),
            ("POST", r"/v1/subscriptions/(?P<id>[^/]+)", self.update_subscription),
            ("GET", r"/v1/invoices/(?P<id>[^/]+)", lambda p, i: self._get("invoice", i)),
            ("GET", r"/v1/events", lambda p: self._page(list(reversed(self.events)), p, "/v1/events")),
        ]
        params = {**query, **form}
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and route_method == method:
                result = handler(params, *match.groups())
                return 200, copy.deepcopy(result)
        raise StripeApiError(404, f"Unrecognized request URL ({method}: {path}).")

    def create_customer(self, params: dict[str, Any]) -> dict[str, Any]:
        customer = {"id": self._id("cus"), "object": "customer", "email": params.get("email"),
                    "metadata": params.get("metadata") or {}, "created": int(time.time()), "livemode": False}
        self.objects["customer"][customer["id"]] = customer
        return customer

    def create_price_api(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._get("price", self.create_price(int(params["unit_amount"]), params.get("nickname", "plan")))

    def create_checkout_session(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("mode") != "subscription":
            raise StripeApiError(400, "This integration only supports mode=subscription.", param="mode")
        for name in ("success_url", "line_items"):
            if not params.get(name):
                raise StripeApiError(400, f"Missing required param: {name}.", code="parameter_missing", param=name)
        customer = params.get("customer")
        if customer:
            self._get("customer", customer, "customer")
        for index, line in enumerate(params["line_items"]):
            self._get("price", line.get("price", ""), f"line_items[{index}][price]")
        session_id = self._id("cs")
        session = {
            "id": session_id, "object": "checkout.session", "mode": "subscription", "status": "open",
            "payment_status": "unpaid", "customer": customer, "client_reference_id": params.get("client_reference_id"),
            "metadata": params.get("metadata") or {}, "subscription": None, "success_url": params["success_url"],
            "cancel_url": params.get("cancel_url"), "url": f"https://checkout.stripe.test/c/pay/{session_id}",
            "line_items": params["line_items"], "subscription_data": params.get("subscription_data") or {},
            "created": int(time.time()), "livemode": False,
        }
        self.objects["checkout.session"][session_id] = session
        return {k: v for k, v in session.items() if k not in ("line_items", "subscription_data")}

    def create_portal_session(self, params: dict[str, Any]) -> dict[str, Any]:
        customer = params.get("customer")
        if not customer:
            raise StripeApiError(400, "Missing required param: customer.", code="parameter_missing", param="customer")
        self._get("customer", customer, "customer")
        session_id = self._id("bps")
        session = {"id": session_id, "object": "billing_portal.session", "customer": customer,
                   "return_url": params.get("return_url"), "url": f"https://billing.stripe.test/p/session/{session_id}",
                   "created": int(time.time()), "livemode": False}
        self.objects["billing_portal.session"][session_id] = session
        return session

    def list_subscriptions(self, params: dict[str, Any]) -> dict[str, Any]:
        found = list(self.objects["subscription"].values())
        if params.get("customer"):
            found = [s for s in found if s["customer"] == params["customer"]]
        status = params.get("status")
        if status is None:
            found = [s for s in found if s["status"] != "canceled"]
        elif status != "all":
            found = [s for s in found if s["status"] == status]
        found.sort(key=lambda s: s["created"], reverse=True)
        return self._page(found, params, "/v1/subscriptions")

    def _page(self, items: list[dict[str, Any]], params: dict[str, Any], url: str) -> dict[str, Any]:
        limit = int(params.get("limit", 10))
        after = params.get("starting_after")
        if after:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise StripeApiError(400, f"Invalid starting_after: {after}", param="starting_after")
            items = items[ids.index(after) + 1:]
        return {"object": "list", "data": items[:limit], "has_more": len(items) > limit, "url": url}

    def update_subscription(self, params: dict[str, Any], subscription_id: str) -> dict[str, Any]:
        subscription = self._get("subscription", subscription_id)
        if subscription["status"] == "canceled":
            raise StripeApiError(400, "A canceled subscription can only update its cancellation_details and metadata.")
        previous: dict[str, Any] = {}
        if "cancel_at_period_end" in params:
            previous["cancel_at_period_end"] = subscription["cancel_at_period_end"]
            subscription["cancel_at_period_end"] = _flag(params["cancel_at_period_end"])
        if "metadata" in params:
            subscription["metadata"].update(params["metadata"])
        invoice = None
        for index, change in enumerate(params.get("items") or []):
            item = next((i for i in subscription["items"]["data"] if i["id"] == change.get("id")), None)
            if item is None:
                raise StripeApiError(400, f"Invalid subscription item: {change.get('id')}",
                                     param=f"items[{index}][id]")
            new_price = self._get("price", change.get("price", ""), f"items[{index}][price]")
            old_price = item["price"]
            previous.setdefault("items", copy.deepcopy(subscription["items"]))
            item["price"] = copy.deepcopy(new_price)
            behavior = params.get("proration_behavior", "create_prorations")
            if behavior == "always_invoice":
                now = int(time.time())
                left = max(0.0, (item["current_period_end"] - now) / (item["current_period_end"]
                                                                        - item["current_period_start"]))
                amount = max(0, round((new_price["unit_amount"] - old_price["unit_amount"]) * left))
                invoice = self._invoice(subscription, amount=amount, paid=True, reason="subscription_update")
        self._emit("customer.subscription.updated", subscription, previous)
        if invoice is not None:
            self._emit("invoice.paid", invoice)
        return subscription

    # --- serving -------------------------------------------------------------------------------

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        status, answer = await self._answer(scope, headers, body)
        payload = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"request-id", b"req_test"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    async def _answer(self, scope: dict[str, Any], headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        if headers.get("authorization") != f"Bearer {self.api_key}":
            error = StripeApiError(401, "Invalid API Key provided.")
            return error.status, error.body
        key = headers.get("idempotency-key")
        if key and key in self._idempotent:
            return self._idempotent[key]
        query = decode_form(parse_qsl(scope["query_string"].decode(), keep_blank_values=True))
        form = decode_form(parse_qsl(body.decode(), keep_blank_values=True))
        try:
            result = await self.handle(scope["method"], scope["path"], query, form)
        except StripeApiError as exc:
            result = (exc.status, exc.body)
        if key and scope["method"] == "POST":
            self._idempotent[key] = result
        return result

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, self.asgi, config, shutdown_trigger=trio.sleep_forever))
            self.url = binds[0]
            task_status.started(self.url)
