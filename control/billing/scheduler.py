"""The billing scheduler, a service in the app's nursery. Each round (`step`, which tests call directly):

1. reconcile — list every subscription Stripe holds and apply each customer's current one through
   `Billing.apply_mirror`; a local mirror that differs is drift, repaired and logged (audit
   `billing.drift`). Without Stripe configured, or when Stripe cannot be reached this round, the stored
   mirrors are re-applied so time-based changes (grace over, downgrade reached) still happen;
2. enforce — servers beyond the effective plan's limits are suspended (stopped through the
   SuspendServers hook, consoles closed; never deleted); suspensions the plan covers again are lifted;
3. remind — payment failed, renewal coming, period ending after a downgrade, servers suspended: each a
   record in the notification outbox, once (a dedupe key per reminder);
4. deliver — unsent outbox records are mailed through the Mailer; a failed delivery is retried next round.

Admins are billing-exempt: never reminded, never suspended. Every replica may run this: reminders are
deduplicated and delivery is claimed by a conditional update."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import trio

from storage import billing as store_billing
from storage import users
from storage.clock import isoformat, utcnow

from ..mailer import Mailer
from .entitlement import PAID_STATUSES, coverage
from .service import Billing, pick_current
from .stripe_api import BillingProviderError

log = logging.getLogger("zlh.billing.scheduler")

SUSPENSION_REASON = "plan_limit"

REMINDER_TEXT: dict[str, tuple[str, str]] = {
    "payment_failed": ("Your ZLH payment failed", (
        "We could not collect the payment for your {plan} plan. Please update your payment method "
        "before {graceEndsAt}; after that your plan falls back to {fallbackPlan} and servers beyond "
        "its limits are stopped.")),
    "renewal": ("Your ZLH plan renews soon", "Your {plan} plan renews on {renewsAt}."),
    "period_ending": ("Your ZLH plan changes soon", (
        "Your {plan} plan ends on {endsAt}; from then on you are on {nextPlan}. Servers beyond its "
        "limits will be stopped (not deleted).")),
    "suspended": ("ZLH servers stopped", (
        "Your {plan} plan covers fewer servers than you have, so {count} server(s) were stopped: "
        "{servers}. Nothing was deleted; upgrade to start them again.")),
}


@dataclass
class StepReport:
    reconciled: bool = False
    drifted: list[int] = field(default_factory=list)
    plan_changes: dict[int, tuple[str, str]] = field(default_factory=dict)
    suspended: dict[int, list[int]] = field(default_factory=dict)
    lifted: dict[int, list[int]] = field(default_factory=dict)
    queued: list[str] = field(default_factory=list)
    delivered: int = 0


@dataclass
class BillingScheduler:
    billing: Billing
    mailer: Mailer
    interval: float
    running: set[str] = field(default_factory=set)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.running.add("billing")
        task_status.started()
        try:
            while True:
                try:
                    await self.step()
                except Exception:
                    log.exception("billing round failed")
                await trio.sleep(self.interval)
        finally:
            self.running.discard("billing")
            with trio.CancelScope(shield=True):
                await self.billing.aclose()

    async def step(self) -> StepReport:
        report = StepReport()
        await self.reconcile(report)
        await self.enforce(report)
        await self.remind(report)
        report.delivered = await self.deliver()
        return report

    async def reconcile(self, report: StepReport) -> None:
        billing = self.billing
        accounts = await billing.store.run(store_billing.accounts)
        current: dict[str, dict[str, Any] | None] = {}
        if billing.stripe is not None:
            try:
                by_customer: dict[str, list[dict[str, Any]]] = {}
                for listed in await billing.stripe.all_subscriptions():
                    by_customer.setdefault(str(listed.get("customer")), []).append(listed)
                current = {customer: pick_current(subs) for customer, subs in by_customer.items()}
                report.reconciled = True
            except BillingProviderError as exc:
                log.warning("reconcile skipped: Stripe unreachable", extra={"fields": {"error": exc.message}})
        for account in accounts:
            if report.reconciled and account.customer_id:
                subscription = current.get(account.customer_id)
                applied = await billing.apply_subscription(account.user_id, subscription, source="reconcile")
            else:
                applied = await billing.apply_mirror(account.user_id, store_billing.mirror_of(account),
                                                     source="schedule")
            if applied.drifted:
                report.drifted.append(account.user_id)
            if applied.previous_plan != applied.plan:
                report.plan_changes[account.user_id] = (applied.previous_plan, applied.plan)

    async def enforce(self, report: StepReport) -> None:
        billing = self.billing
        for account in await billing.store.run(store_billing.accounts):
            user_id = account.user_id

            def decide(user_id: int = user_id) -> tuple[Any, Any]:
                user = users.user_by_id(user_id)
                if user is None or user.role == "admin":
                    return user, None
                return user, coverage(store_billing.owned_servers(user_id), billing.catalog.limits(user.plan))

            user, decision = await billing.store.run(decide)
            if decision is None:
                continue
            if decision.lift:
                await billing.store.run(store_billing.lift, decision.lift)
                report.lifted[user_id] = decision.lift
            if decision.suspend:
                try:
                    await self.suspend(user, decision.suspend)
                except Exception:
                    # Not recorded, so the next round tries again; other users are not held up.
                    log.exception("suspending servers failed", extra={"fields": {"user": user_id}})
                    continue
                report.suspended[user_id] = decision.suspend

    async def suspend(self, user: Any, instance_ids: list[int]) -> None:
        stopper = self.billing.suspend_servers
        if stopper is None:
            log.warning("servers suspended without a server stopper wired",
                        extra={"fields": {"user": user.id, "servers": instance_ids}})
        else:
            await stopper(user.id, instance_ids, SUSPENSION_REASON)

        def record() -> None:
            store_billing.suspend(user.id, instance_ids, SUSPENSION_REASON)
            users.audit("billing.suspended", None, f"user:{user.id}", servers=instance_ids, plan=user.plan)
            store_billing.queue_notification(
                user.id, "suspended", f"suspended:{user.id}:{','.join(map(str, instance_ids))}:{isoformat(utcnow())}",
                {"plan": user.plan, "count": len(instance_ids), "servers": instance_ids})

        await self.billing.store.run(record)

    async def remind(self, report: StepReport) -> None:
        billing = self.billing
        now = utcnow()
        notice = timedelta(seconds=billing.settings.billing_renewal_notice)

        def queue_all() -> list[str]:
            queued = []
            for account in store_billing.accounts():
                user = users.user_by_id(account.user_id)
                if user is None or user.role == "admin":
                    continue
                for kind, key, payload in reminders_due(billing, account, user.plan, now, notice):
                    if store_billing.queue_notification(user.id, kind, key, payload):
                        queued.append(key)
            return queued

        report.queued.extend(await billing.store.run(queue_all))

    async def deliver(self) -> int:
        store = self.billing.store
        delivered = 0
        for pending in await store.run(store_billing.claim_unsent):
            subject, template = REMINDER_TEXT.get(pending.kind, ("ZLH billing", "{kind}"))
            fields = {"kind": pending.kind, **{k: _text(v) for k, v in pending.payload.items()}}
            try:
                with trio.fail_after(30):
                    await self.mailer.send(pending.email, subject, template.format_map(_Missing(fields)))
                delivered += 1
            except (OSError, trio.TooSlowError) as exc:
                log.warning("reminder delivery failed", extra={"fields": {"notification": pending.id}})
                await store.run(store_billing.release, pending.id, repr(exc))
        return delivered


def reminders_due(billing: Billing, account: Any, plan: str, now: datetime,
                  notice: timedelta) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, dedupe key, payload) of every reminder this account is due now."""
    due: list[tuple[str, str, dict[str, Any]]] = []
    user_id = account.user_id
    catalog = billing.catalog
    period_end = account.current_period_end
    if account.delinquent_since is not None:
        due.append(("payment_failed", f"payment_failed:{user_id}:{isoformat(account.delinquent_since)}", {
            "plan": catalog.plan_for_price(account.price_id) or plan,
            "graceEndsAt": isoformat(account.delinquent_since + billing.grace),
            "fallbackPlan": catalog.default_plan}))
    ending_at = account.kept_until or (period_end if account.cancel_at_period_end else None)
    if ending_at is not None and now < ending_at <= now + notice and account.status in PAID_STATUSES | {"past_due"}:
        next_plan = (catalog.default_plan if account.cancel_at_period_end
                     else catalog.plan_for_price(account.price_id) or catalog.default_plan)
        due.append(("period_ending", f"period_ending:{user_id}:{isoformat(ending_at)}", {
            "plan": account.kept_plan or plan, "nextPlan": next_plan, "endsAt": isoformat(ending_at)}))
    elif (account.status in PAID_STATUSES and period_end is not None and not account.cancel_at_period_end
          and now < period_end <= now + notice):
        due.append(("renewal", f"renewal:{user_id}:{isoformat(period_end)}", {
            "plan": plan, "renewsAt": isoformat(period_end)}))
    return due


def _text(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


class _Missing(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> str:
        return "?"
