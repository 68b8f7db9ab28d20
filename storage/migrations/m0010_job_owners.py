"""Job backend multi-tenancy: `owner_id` on projects, jobs and vault connections, and on runners the
admin who registered them plus `shared` (may lease regular users' jobs).

m0004 creates its tables from the current models, so a database made from scratch has the columns
already; one made before this migration gets them added here. Rows that existed before belong to the
first admin (lowest id); on a database without an admin they stay NULL, which only admins see."""

import peewee
from playhouse import migrate as schema

OWNED = ("project", "job", "vault_connection", "runner")


def up(db: peewee.Database) -> None:
    migrator = schema.SchemaMigrator.from_database(db)
    for table in OWNED:
        if "owner_id" not in {column.name for column in db.get_columns(table)}:
            schema.migrate(migrator.add_column(table, "owner_id", peewee.IntegerField(null=True)),
                           migrator.add_index(table, ("owner_id",)))
    if "shared" not in {column.name for column in db.get_columns("runner")}:
        schema.migrate(migrator.add_column("runner", "shared", peewee.BooleanField(default=False)))
    first_admin = db.execute_sql("SELECT MIN(id) FROM \"user\" WHERE role = 'admin'").fetchone()[0]
    if first_admin is not None:
        for table in OWNED:
            db.execute_sql(f"UPDATE {table} SET owner_id = {int(first_admin)} WHERE owner_id IS NULL")
