"""Dev environments (`/api/v1/environments`): one row per environment, backed by a dev instance."""

import peewee

from .. import environments

TABLES = environments.ENVIRONMENT_MODELS


def up(db: peewee.Database) -> None:
    with db.bind_ctx(TABLES):
        db.create_tables(TABLES)
