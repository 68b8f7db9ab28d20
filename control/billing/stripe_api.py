"""The Stripe adapter: the few Stripe API calls billing makes, through the official `stripe` library's
StripeClient (async methods, an httpx transport with a timeout), answering plain dicts in Stripe's own
shapes. `STRIPE_API_BASE` points it elsewhere (the tests' local Stripe-compatible server).

It never decides anything and never touches the database; every failure is one BillingProviderError."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from storage.billing import SubscriptionMirror


class BillingProviderError(Exception):
    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


def _plain(obj: Any) -> dict[str, Any]:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def subscription_mirror(subscription: dict[str, Any]) -> SubscriptionMirror:
    """Stripe's subscription in the gateway's terms. The billing period lives on the subscription item
    in current API versions (on the subscription itself in older ones)."""
    items = (subscription.get("items") or {}).get("data") or []
    item = items[0] if items else {}
    price = item.get("price") or {}
    period_end = item.get("current_period_end") or subscription.get("current_period_end")
    return SubscriptionMirror(
        subscription_id=subscription["id"],
        status=subscription.get("status") or "none",
        price_id=price.get("id") if isinstance(price, dict) else price,
        current_period_end=(datetime.fromtimestamp(period_end, UTC).replace(tzinfo=None)
                            if period_end else None),
        cancel_at_period_end=bool(subscription.get("cancel_at_period_end")),
    )


def first_item_id(subscription: dict[str, Any]) -> str:
    items = (subscription.get("items") or {}).get("data") or []
    if not items:
        raise BillingProviderError("subscription has no items")
    return str(items[0]["id"])


class StripeApi:
    def __init__(self, secret_key: str, *, api_base: str = "", timeout: float = 10.0) -> None:
        import stripe  # here, not at the top: ~23 MB that a gateway without Stripe configured never loads

        self._error = stripe.StripeError
        self._http = stripe.HTTPXClient(timeout=timeout)
        self._client = stripe.StripeClient(
            secret_key, base_addresses={"api": api_base} if api_base else None, http_client=self._http,
            max_network_retries=1)

    async def aclose(self) -> None:
        await self._http.close_async()

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except self._error as exc:
            raise BillingProviderError(exc.user_message or str(exc), exc.http_status, exc.code) from exc

    async def create_customer(self, email: str, user_id: int) -> str:
        customer = await self._call(
            self._client.v1.customers.create_async,
            {"email": email, "metadata": {"zlh_user_id": str(user_id)}},
            {"idempotency_key": f"zlh-customer-{user_id}"})
        return str(customer.id)

    async def checkout_session(self, *, customer_id: str, price_id: str, user_id: int, plan: str,
                               success_url: str, cancel_url: str) -> dict[str, Any]:
        session = await self._call(self._client.v1.checkout.sessions.create_async, {
            "mode": "subscription",
            "customer": customer_id,
            "client_reference_id": str(user_id),
            "line_items": [{"price": price_id, "quantity": 1}],
            "success_url": success_url,
            "cancel_url": cancel_url,
            "metadata": {"zlh_user_id": str(user_id), "zlh_plan": plan},
            "subscription_data": {"metadata": {"zlh_user_id": str(user_id)}},
        })
        return _plain(session)

    async def portal_session(self, *, customer_id: str, return_url: str) -> dict[str, Any]:
        session = await self._call(self._client.v1.billing_portal.sessions.create_async,
                                   {"customer": customer_id, "return_url": return_url})
        return _plain(session)

    async def subscription(self, subscription_id: str) -> dict[str, Any]:
        return _plain(await self._call(self._client.v1.subscriptions.retrieve_async, subscription_id))

    async def change_price(self, subscription: dict[str, Any], price_id: str, *, prorate_now: bool) -> dict[str, Any]:
        """Swap the subscription's price: prorated and invoiced at once (upgrade), or with no proration
        so the new price is billed from the next period (downgrade)."""
        updated = await self._call(self._client.v1.subscriptions.update_async, subscription["id"], {
            "items": [{"id": first_item_id(subscription), "price": price_id}],
            "proration_behavior": "always_invoice" if prorate_now else "none",
            "cancel_at_period_end": False,
        })
        return _plain(updated)

    async def cancel_at_period_end(self, subscription_id: str) -> dict[str, Any]:
        updated = await self._call(self._client.v1.subscriptions.update_async, subscription_id,
                                   {"cancel_at_period_end": True})
        return _plain(updated)

    async def customer_subscriptions(self, customer_id: str) -> list[dict[str, Any]]:
        """The customer's subscriptions in any status (all pages)."""
        return await self._list_subscriptions({"customer": customer_id, "status": "all", "limit": 100})

    async def all_subscriptions(self) -> list[dict[str, Any]]:
        """Every subscription Stripe holds for this account, in any status (all pages)."""
        return await self._list_subscriptions({"status": "all", "limit": 100})

    async def _list_subscriptions(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        page = await self._call(self._client.v1.subscriptions.list_async, params)
        found: list[dict[str, Any]] = []
        try:
            async for subscription in page.auto_paging_iter():
                found.append(_plain(subscription))
        except self._error as exc:
            raise BillingProviderError(exc.user_message or str(exc), exc.http_status, exc.code) from exc
        return found
