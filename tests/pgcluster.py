"""A throwaway PostgreSQL 15 cluster for the test session: unix socket only (no TCP port to collide),
fsync off, one template database with the schema, a fresh database per test cloned from it.

PostgreSQL refuses to run as root, so as root the cluster is run as the `postgres` user."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

PG_BIN = Path(os.environ.get("ZLH_PG_BIN", "/usr/lib/postgresql/15/bin"))
TEMPLATE = "zlh_template"


class PgCluster:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="zlh-pg-"))
        self.port = 54000 + os.getpid() % 1000
        self._names = itertools.count(1)
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        os.chmod(self.dir, 0o700)

    def _run(self, *argv: str) -> None:
        cmd = list(argv)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, cwd="/tmp")

    def start(self) -> None:
        data = self.dir / "data"
        self._run(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        options = (
            f"-c listen_addresses='' -k {self.dir} -p {self.port} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l", str(self.dir / "log"), "start")

    def stop(self) -> None:
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@/{dbname}?host={self.dir}&port={self.port}"

    def admin_sql(self, sql: str) -> None:
        import psycopg2

        conn = psycopg2.connect(dbname="postgres", user="postgres", host=str(self.dir), port=self.port)
        conn.autocommit = True
        try:
            conn.cursor().execute(sql)
        finally:
            conn.close()

    def create_template(self, prepare) -> None:  # type: ignore[no-untyped-def]
        self.admin_sql(f"CREATE DATABASE {TEMPLATE}")
        prepare(self.url(TEMPLATE))

    def fresh_database(self) -> str:
        name = f"t_{next(self._names)}"
        self.admin_sql(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return self.url(name)
