"""The first schema: every table of storage.models as of this version."""

import peewee

from .. import models

TABLES = [
    models.Plan,
    models.User,
    models.RefreshFamily,
    models.RefreshToken,
    models.PasswordReset,
    models.Instance,
    models.InstanceArchive,
    models.AgentState,
    models.AuditLog,
    models.RateLimitBucket,
]


def up(db: peewee.Database) -> None:
    with db.bind_ctx(TABLES):
        db.create_tables(TABLES)
