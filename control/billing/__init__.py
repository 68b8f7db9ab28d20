"""Stripe billing: checkout, plan changes, customer portal, webhooks and the billing scheduler.
`routes()` is mounted by control/app.py; `Billing` and `BillingScheduler` are assembled there."""

from .routes import routes
from .scheduler import BillingScheduler
from .service import Billing, SuspendServers

__all__ = ["Billing", "BillingScheduler", "SuspendServers", "routes"]
