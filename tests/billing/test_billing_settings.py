"""Billing settings come from the environment once; the Stripe secrets never show in a repr."""

from __future__ import annotations

from pathlib import Path

from control.config import Settings


def test_stripe_settings_and_plan_prices_come_from_the_environment(tmp_path: Path) -> None:
    env = {"STRIPE_SECRET_KEY": "sk_test_secretvalue", "STRIPE_WEBHOOK_SECRET": "whsec_secretvalue",
           "STRIPE_API_BASE": "http://127.0.0.1:9", "STRIPE_PRICE_PRO": "price_pro_1",
           "BILLING_GRACE_PERIOD": "3600", "BILLING_INTERVAL": "60", "JWT_SECRET": "j" * 40}
    settings = Settings.from_env(env=env, data_dir=tmp_path)
    assert settings.stripe_secret_key == "sk_test_secretvalue"
    assert settings.stripe_api_base == "http://127.0.0.1:9"
    assert settings.billing_grace_period == 3600 and settings.billing_interval == 60.0
    prices = {plan["name"]: plan["stripe_price_id"] for plan in settings.plans}
    assert prices == {"free": None, "pro": "price_pro_1"}
    shown = repr(settings)
    assert "sk_test_secretvalue" not in shown and "whsec_secretvalue" not in shown
