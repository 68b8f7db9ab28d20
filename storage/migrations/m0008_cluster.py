"""Scale-out: the replica registry, poller slot leases and named once-per-fleet leases."""

import peewee

from .. import cluster

TABLES = cluster.TABLES


def up(db: peewee.Database) -> None:
    with db.bind_ctx(TABLES):
        db.create_tables(TABLES)
