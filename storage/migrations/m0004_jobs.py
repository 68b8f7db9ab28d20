"""The job backend's tables: runners, projects, pipelines, chains, jobs, artifacts, test cases, vault."""

import peewee

from .. import jobs

TABLES = list(jobs.TABLES)


def up(db: peewee.Database) -> None:
    with db.bind_ctx(TABLES):
        db.create_tables(TABLES)
