"""Scale-out: `driven_by`, the replica driving an operation in progress, on instances and environments.

m0001 and m0007 create their tables from the current models, so a database made from scratch has the
column already; only one made before this migration gets it added here."""

import peewee
from playhouse import migrate as schema

TABLES = ("instance", "environment")


def up(db: peewee.Database) -> None:
    migrator = schema.SchemaMigrator.from_database(db)
    for table in TABLES:
        if "driven_by" not in {column.name for column in db.get_columns(table)}:
            schema.migrate(migrator.add_column(table, "driven_by", peewee.CharField(null=True, max_length=128)))
