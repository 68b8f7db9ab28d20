"""Billing tables: each user's Stripe account mirror, the processed-webhook ledger (unique by event id),
the notification outbox and server suspensions."""

import peewee

from .. import billing

TABLES = billing.TABLES


def up(db: peewee.Database) -> None:
    with db.bind_ctx(TABLES):
        db.create_tables(TABLES)
