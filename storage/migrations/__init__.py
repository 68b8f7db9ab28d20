"""Versioned migrations, applied in order at start-up (`make run`) and by `python -m control migrate`.

Each migration is a module `mNNNN_<name>.py` with `up(db)`. Applied versions are recorded in
`schema_migrations`; on PostgreSQL an advisory lock makes concurrent replicas apply them once.
Start-up seeding that every replica does (the configured plans, …) is handed to `migrate` as `seed`
and runs under the same lock, in the same transaction: replicas started at the same instant on an
empty database never race a check-then-insert.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import peewee

from ..clock import utcnow
from ..db import is_postgres

_LOCK_KEY = 0x5A4C48  # "ZLH"


def available() -> list[tuple[int, str]]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("m") and info.name[1:5].isdigit():
            found.append((int(info.name[1:5]), info.name))
    return sorted(found)


def migrate(db: peewee.Database, seed: Callable[[], None] | None = None) -> list[int]:
    """Apply every migration not yet recorded, then `seed()` (under the lock); return the versions
    applied now."""
    applied_now: list[int] = []
    with db.connection_context(), db.atomic():
        if is_postgres(db):
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        db.execute_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name VARCHAR(128) NOT NULL, applied_at TIMESTAMP NOT NULL)"
        )
        done = {row[0] for row in db.execute_sql("SELECT version FROM schema_migrations")}
        for version, name in available():
            if version in done:
                continue
            module = importlib.import_module(f"{__name__}.{name}")
            module.up(db)
            param = "%s" if is_postgres(db) else "?"
            db.execute_sql(
                f"INSERT INTO schema_migrations (version, name, applied_at) VALUES ({param}, {param}, {param})",
                (version, name, utcnow()),
            )
            applied_now.append(version)
        if seed is not None:
            seed()
    return applied_now
