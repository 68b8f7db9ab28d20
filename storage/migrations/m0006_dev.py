"""Dev instances: IDE connection activity per (instance, replica), for idle auto-stop."""

import peewee

from .. import dev

TABLES = dev.DEV_MODELS


def up(db: peewee.Database) -> None:
    with db.bind_ctx(TABLES):
        db.create_tables(TABLES)
