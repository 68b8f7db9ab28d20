"""A throwaway PostgreSQL 15 cluster, for the test session (tests/pgcluster.py re-exports it) and for
the bench's scale-out scenario: its own directory under /tmp, unix socket only (`listen_addresses=''`,
so there is no TCP port to collide; the port number only names the socket file), started with pg_ctl
and stopped and removed by whoever started it. PostgreSQL refuses to run as root, so as root the
cluster runs as the `postgres` user (runuser).

It also reads what the bench reports about PostgreSQL's load: the postmaster's pid (its process tree is
every PostgreSQL process, whose CPU the bench reads from /proc), which backend serves which client
(pg_stat_activity.application_name, which clients set through their URL), and the database's
transaction and row-update counters. It must never start, signal or remove a cluster it did not create.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg2
import trio

PG_BIN = Path(os.environ.get("ZLH_PG_BIN", "/usr/lib/postgresql/15/bin"))
TEMPLATE = "zlh_template"
# Tests want speed; the bench measures the load of a production-like setting, so it keeps
# PostgreSQL's durable defaults (fsync, synchronous commit, full-page writes).
NOT_DURABLE = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


class PgCluster:
    def __init__(self, *, durable: bool = False, max_connections: int = 300) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="zlh-pg-"))
        self.port = 54000 + os.getpid() % 1000
        self.durable = durable
        self.max_connections = max_connections
        self._names = itertools.count(1)
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        os.chmod(self.dir, 0o700)

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def _run(self, *argv: str) -> None:
        cmd = list(argv)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, cwd="/tmp")

    def start(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")
        options = (f"-c listen_addresses='' -k {self.dir} -p {self.port} "
                   f"-c max_connections={self.max_connections}")
        if not self.durable:
            options += f" {NOT_DURABLE}"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-o", options, "-w", "-l",
                  str(self.dir / "log"), "start")

    def stop(self) -> None:
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, dbname: str, *, application_name: str | None = None) -> str:
        """A DATABASE_URL; storage/db.py passes query parameters on to the driver, so
        `application_name` names this client's backends in pg_stat_activity."""
        url = f"postgresql://postgres@/{dbname}?host={self.dir}&port={self.port}"
        if application_name is not None:
            url += f"&application_name={quote(application_name)}"
        return url

    def connect(self, dbname: str = "postgres", *, application_name: str = "zlh-admin") -> Any:
        """An autocommit psycopg2 connection (each statement its own transaction, so statistics
        views are read fresh every time rather than from a transaction's snapshot)."""
        conn = psycopg2.connect(dbname=dbname, user="postgres", host=str(self.dir), port=self.port,
                                application_name=application_name)
        conn.autocommit = True
        return conn

    def admin_sql(self, sql: str) -> None:
        conn = self.connect()
        try:
            conn.cursor().execute(sql)
        finally:
            conn.close()

    def create_template(self, prepare: Callable[[str], None]) -> None:
        self.admin_sql(f"CREATE DATABASE {TEMPLATE}")
        prepare(self.url(TEMPLATE))

    def fresh_database(self) -> str:
        name = f"t_{next(self._names)}"
        self.admin_sql(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return self.url(name)

    def empty_database(self) -> str:
        """A database with nothing in it (not even the schema): what a first start finds."""
        name = f"e_{next(self._names)}"
        self.admin_sql(f"CREATE DATABASE {name}")
        return self.url(name)

    @property
    def log_path(self) -> Path:
        """The server's log (pg_ctl -l): errors such as "deadlock detected" land here."""
        return self.dir / "log"

    def log_since(self, offset: int) -> str:
        """What the server logged after byte `offset` of its log (`log_size()` before the work)."""
        with open(self.log_path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def postmaster_pid(self) -> int:
        """The postmaster's pid: every other PostgreSQL process of this cluster is its child."""
        return int((self.data_dir / "postmaster.pid").read_text().split()[0])


@asynccontextmanager
async def running_postgres(*, durable: bool = True, max_connections: int = 300) -> AsyncIterator[PgCluster]:
    """A cluster for the duration of the block; stopped and removed however the block exits."""
    cluster = PgCluster(durable=durable, max_connections=max_connections)
    try:
        await trio.to_thread.run_sync(cluster.start)
        yield cluster
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(cluster.stop)


def backend_roles(conn: Any) -> dict[int, str]:
    """pid → what each PostgreSQL process does, from pg_stat_activity: a client backend's
    application_name (the client it serves), else its backend type ("checkpointer", "autovacuum
    worker", …). The postmaster itself is not listed."""
    cursor = conn.cursor()
    cursor.execute("SELECT pid, CASE WHEN backend_type = 'client backend' THEN application_name "
                   "ELSE backend_type END FROM pg_stat_activity")
    return {int(pid): str(role) for pid, role in cursor.fetchall()}


@dataclass(frozen=True)
class DatabaseCounters:
    """Cumulative counters of the connected database: transactions (committed and rolled back, from
    pg_stat_database) and rows updated per user table (pg_stat_user_tables)."""

    transactions: int
    rows_updated: dict[str, int]

    def rows_updated_since(self, before: DatabaseCounters) -> dict[str, int]:
        return {table: count - before.rows_updated.get(table, 0) for table, count in self.rows_updated.items()}


def database_counters(conn: Any) -> DatabaseCounters:
    cursor = conn.cursor()
    cursor.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()")
    transactions = int(cursor.fetchone()[0])
    cursor.execute("SELECT relname, n_tup_upd FROM pg_stat_user_tables")
    return DatabaseCounters(transactions, {str(name): int(count) for name, count in cursor.fetchall()})


def postgres_missing() -> str | None:
    """Why the PostgreSQL binaries cannot be used, or None when they can."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing; `make pg-binaries`)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no `postgres` user to run PostgreSQL as"
    return None
