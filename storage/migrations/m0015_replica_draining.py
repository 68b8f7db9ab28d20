"""Drain: `draining` on cluster replicas. A draining replica keeps heartbeating (it still drives the
operations it started) but is left out of the slot split, so the others take its agents at once.

m0008 creates the table from the current model, so a database made from scratch has the column
already; only one made before this migration gets it added here."""

import peewee
from playhouse import migrate as schema


def up(db: peewee.Database) -> None:
    if "draining" not in {column.name for column in db.get_columns("cluster_replica")}:
        migrator = schema.SchemaMigrator.from_database(db)
        schema.migrate(migrator.add_column("cluster_replica", "draining", peewee.BooleanField(default=False)))
