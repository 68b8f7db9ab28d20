"""Accounts: `user.deleted_at` (soft delete by an admin) and `used_token` (IDE link tokens already
traded, so a link works once on every replica).

m0001 creates its tables from the current models, so a database made from scratch has the column
already; only one made before this migration gets it added here."""

import peewee
from playhouse import migrate as schema

from .. import models


def up(db: peewee.Database) -> None:
    if "deleted_at" not in {column.name for column in db.get_columns("user")}:
        migrator = schema.SchemaMigrator.from_database(db)
        schema.migrate(migrator.add_column("user", "deleted_at", peewee.DateTimeField(null=True)))
    with db.bind_ctx([models.UsedToken]):
        db.create_tables([models.UsedToken])
