"""The test session's throwaway PostgreSQL 15 cluster (tests/conftest.py starts it once per session,
clones a fresh database per test from a migrated template). It lives in bench/postgres.py, which the
bench's scale-out scenario also starts; this module only re-exports it for the tests."""

from bench.postgres import PG_BIN, TEMPLATE, PgCluster

__all__ = ["PG_BIN", "TEMPLATE", "PgCluster"]
