"""An index for the Portal's server listings by owner in id order (storage/instances.py portal_rows):
a user's page (`owner_id = ? AND id > ? ORDER BY id LIMIT n`) is one index range scan at any depth.
An admin's listing pages on the primary key."""

import peewee


def up(db: peewee.Database) -> None:
    db.execute_sql("CREATE INDEX IF NOT EXISTS instance_owner_id_id ON instance (owner_id, id)")
