"""m0010: a database made before job owners existed gets `owner_id` on projects, jobs, vault connections
and runners, and `shared` on runners; the rows it had belong to the first admin. Run on a real
database of each kind: migrated, then put back into the shape it had before m0010."""

from __future__ import annotations

import peewee
from playhouse import migrate as schema

from storage.db import connect_database
from storage.migrations import migrate

TABLES = ("project", "job", "vault_connection", "runner")


def _columns(db: peewee.Database, table: str) -> set[str]:
    return {column.name for column in db.get_columns(table)}


def test_rows_from_before_owners_belong_to_the_first_admin(database_url: str) -> None:
    db = connect_database(database_url)
    try:
        migrate(db)
        with db.connection_context():
            for email, role in (("user@example.com", "user"), ("first@example.com", "admin"),
                                ("second@example.com", "admin")):
                db.execute_sql('INSERT INTO "user" (email, password_hash, role, plan, created_at) '
                               "VALUES (%s, 'x', %s, 'free', CURRENT_TIMESTAMP)".replace(
                                   "%s", "?" if "sqlite" in database_url else "%s"), (email, role))
            first_admin = db.execute_sql("SELECT MIN(id) FROM \"user\" WHERE role = 'admin'").fetchone()[0]
            db.execute_sql("INSERT INTO project (name, description, default_ref, config_yaml, created_at, loaded_at) "
                           "VALUES ('old', '', 'main', 'x', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)")
            db.execute_sql("INSERT INTO job (project_name, pipeline_name, status, labels, steps, env, execution_mode, "
                           "timeout_seconds, output, attempts, max_attempts, created_at) VALUES ('old', 'build', "
                           "'done', '[]', '[]', '{}', 'standard', 60, '', 1, 1, CURRENT_TIMESTAMP)")
            db.execute_sql("INSERT INTO vault_connection (name, kind, url, sealed_secret, created_at) "
                           "VALUES ('old', 'git', 'https://example.com/r.git', 'v1.x', CURRENT_TIMESTAMP)")
            db.execute_sql("INSERT INTO runner (id, name, token_hash, labels, active, shared, cached_sources, created_at) "
                           "VALUES ('agt_old', 'old', 'h', '[]', TRUE, TRUE, '[]', CURRENT_TIMESTAMP)")
            migrator = schema.SchemaMigrator.from_database(db)
            for table in TABLES:
                schema.migrate(migrator.drop_index(table, f"{table}_owner_id"), migrator.drop_column(table, "owner_id"))
            schema.migrate(migrator.drop_column("runner", "shared"))
            db.execute_sql("DELETE FROM schema_migrations WHERE version = 10")
            assert all("owner_id" not in _columns(db, table) for table in TABLES)

        assert migrate(db) == [10]
        with db.connection_context():
            for table in TABLES:
                assert "owner_id" in _columns(db, table)
                assert db.execute_sql(f"SELECT owner_id FROM {table}").fetchall() == [(first_admin,)]
            assert db.execute_sql("SELECT shared FROM runner").fetchall() in ([(False,)], [(0,)])
        assert migrate(db) == []
    finally:
        db.close()
