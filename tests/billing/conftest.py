"""Billing fixtures: the local Stripe-compatible server (started for real on loopback), settings that
point the gateway at it with three plans, webhook delivery signed by the stripe library, the billing
scheduler over the gateway's own database handle, and the one clock put back after each test."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import stripe
import trio

from control.billing import Billing, BillingScheduler
from control.config import Settings
from control.mailer import Mailer
from storage import clock
from storage.db import Store, database
from tests.billing.stripe_server import FakeStripe
from tests.conftest import Gateway

API_KEY = "sk_test_" + "z" * 24
WEBHOOK_SECRET = "whsec_" + "w" * 32


@pytest.fixture(autouse=True)
def restore_clock() -> Iterator[None]:
    yield
    clock.offset = clock.offset.__class__(0)


@pytest.fixture
async def fake_stripe(nursery: trio.Nursery) -> FakeStripe:
    server = FakeStripe(API_KEY)
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def settings(settings: Settings, fake_stripe: FakeStripe) -> Settings:
    starter = fake_stripe.create_price(500, "starter")
    pro = fake_stripe.create_price(1500, "pro")
    base = {"max_cpu_cores": 2, "max_memory_mb": 4096, "max_disk_gb": 20, "max_upload_bytes": 1024**3}
    settings.plans = [
        {"name": "free", "max_game_servers": 1, "max_dev_servers": 1, **base, "stripe_price_id": None},
        {"name": "starter", "max_game_servers": 2, "max_dev_servers": 1, **base, "stripe_price_id": starter},
        {"name": "pro", "max_game_servers": 5, "max_dev_servers": 3, **base, "stripe_price_id": pro},
    ]
    settings.stripe_secret_key = API_KEY
    settings.stripe_webhook_secret = WEBHOOK_SECRET
    settings.stripe_api_base = fake_stripe.url
    settings.public_url = "https://portal.zlh.test"
    settings.billing_interval = 3600  # the app's own scheduler runs once at start; tests step it
    return settings


def signed(event: dict[str, Any], *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> tuple[str, str]:
    payload = json.dumps(event)
    return payload, stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp)


async def deliver(client: httpx.AsyncClient, event: dict[str, Any], **sign: Any) -> httpx.Response:
    payload, header = signed(event, **sign)
    return await client.post("/api/billing/webhook", content=payload,
                             headers={"stripe-signature": header, "content-type": "application/json"})


@dataclass
class BillingWorld:
    gateway: Gateway
    stripe: FakeStripe
    scheduler: BillingScheduler
    store: Store

    @property
    def client(self) -> httpx.AsyncClient:
        return self.gateway.client

    async def deliver_all(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            response = await deliver(self.client, event)
            assert response.status_code == 200, response.text

    async def login(self, session: dict[str, Any]) -> dict[str, Any]:
        """A fresh session for the same user (after the one clock moved past the access token)."""
        response = await self.client.post("/api/auth/login", json={"email": session["user"]["email"],
                                                                   "password": "password123"})
        assert response.status_code == 200, response.text
        return response.json()

    async def state(self, session: dict[str, Any]) -> dict[str, Any]:
        response = await self.client.get("/api/billing", headers=Gateway.bearer(session))
        assert response.status_code == 200, response.text
        return response.json()

    async def subscribe(self, session: dict[str, Any], plan: str) -> str:
        """Checkout for `plan`, paid, with its webhooks delivered; answers the subscription id."""
        response = await self.client.post("/api/billing/checkout", json={"plan": plan},
                                          headers=Gateway.bearer(session))
        assert response.status_code == 200, response.text
        events = self.stripe.complete_checkout(response.json()["sessionId"])
        await self.deliver_all(events)
        return str(events[0]["data"]["object"]["id"])


@pytest.fixture
async def world(gateway: Gateway, fake_stripe: FakeStripe) -> AsyncIterator[BillingWorld]:
    # The gateway's own database handle (storage.db.database was initialized by its Store).
    store = Store(database.obj, threads=2)
    billing = Billing.from_settings(gateway.settings, store, {})
    scheduler = BillingScheduler(billing, Mailer(gateway.settings.data_dir / "outbox"), interval=3600)
    yield BillingWorld(gateway, fake_stripe, scheduler, store)
    await billing.aclose()
