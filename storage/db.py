"""The database: SQLite by default, PostgreSQL when the URL says so, and `Store.run`, the one way the
rest of the program does storage work from Trio.

peewee is synchronous. Each unit of work (usually one request's worth of reads and writes) runs in a
worker thread, bounded by a CapacityLimiter, with its connection checked out and returned inside that
thread. One thread hop per unit of work, never one per query (measured here: per-query hops cost about
half the throughput). Never call peewee from the Trio thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import peewee
import trio
from playhouse.pool import PooledPostgresqlDatabase

database = peewee.DatabaseProxy()

T = TypeVar("T")


_opened: dict[str, peewee.Database] = {}
_opened_lock = threading.Lock()


def connect_database(url: str, *, max_connections: int = 16) -> peewee.Database:
    """The database named by `url` (`sqlite:///path/file.db` or `postgresql://…`), opened lazily.

    One object per URL per process: the models are bound through one proxy, so two objects for the
    same database in one process would run a unit's queries on a different connection from the one
    holding its transaction (on SQLite that deadlocks as "database is locked")."""
    with _opened_lock:
        if url not in _opened:
            _opened[url] = _open(url, max_connections)
        return _opened[url]


def _open(url: str, max_connections: int) -> peewee.Database:
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = unquote(parsed.path)
        if path.startswith("//"):
            path = path[1:]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return peewee.SqliteDatabase(
            path,
            pragmas={
                "journal_mode": "wal",
                "synchronous": "normal",
                "foreign_keys": 1,
                "busy_timeout": 10_000,
            },
        )
    if parsed.scheme in ("postgres", "postgresql"):
        params: dict[str, Any] = {}
        for item in filter(None, parsed.query.split("&")):
            key, _, value = item.partition("=")
            params[key] = unquote(value)
        return PooledPostgresqlDatabase(
            unquote(parsed.path.lstrip("/")),
            user=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            host=parsed.hostname or params.pop("host", None),
            port=parsed.port or params.pop("port", None),
            max_connections=max_connections,
            stale_timeout=300,
            timeout=10,
            **params,
        )
    raise ValueError(f"unsupported DATABASE_URL scheme {parsed.scheme!r}")


def is_postgres(db: peewee.Database | peewee.DatabaseProxy) -> bool:
    target = db.obj if isinstance(db, peewee.DatabaseProxy) else db
    return isinstance(target, peewee.PostgresqlDatabase)


class Store:
    """Runs units of storage work in worker threads against one database."""

    def __init__(self, db: peewee.Database, *, threads: int = 8) -> None:
        self.db = db
        self.limiter = trio.CapacityLimiter(threads)
        database.initialize(db)

    async def run(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `work(*args, **kwargs)` in one transaction on a worker thread and return its result.
        On SQLite the write lock is taken up front (BEGIN IMMEDIATE), so two read-then-write units
        wait for each other (busy_timeout) instead of failing with "database is locked"."""
        return await self._unit(work, args, kwargs, write=True)

    async def read(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Like `run` for units that only read: on SQLite they never wait for the write lock (WAL
        readers see the last commit). Hot paths (Portal state reads, data-plane authorization) use it."""
        return await self._unit(work, args, kwargs, write=False)

    async def _unit(self, work: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], *,
                    write: bool) -> T:
        sqlite = isinstance(self.db, peewee.SqliteDatabase)
        begin = ("IMMEDIATE",) if sqlite and write else ()

        def unit() -> T:
            if sqlite:
                # One connection per worker thread, kept open: opening one (and its pragmas) per
                # unit cost more than the queries. PostgreSQL units borrow from the pool instead.
                self.db.connect(reuse_if_open=True)
                with self.db.atomic(*begin):
                    return work(*args, **kwargs)
            with self.db.connection_context(), self.db.atomic(*begin):
                return work(*args, **kwargs)

        return await trio.to_thread.run_sync(unit, limiter=self.limiter)

    async def ping(self) -> bool:
        def probe() -> bool:
            self.db.execute_sql("SELECT 1")
            return True

        try:
            with trio.move_on_after(5):
                return await self.read(probe)
        except peewee.DatabaseError:
            return False
        return False

    def close(self) -> None:
        if isinstance(self.db, PooledPostgresqlDatabase):
            self.db.close_idle()  # the database object may be shared by other stores
