"""Edge publishing and Proxmox: VMID reservations, published entries and the publishing outbox."""

import peewee

from .. import edge

TABLES = [edge.VmidReservation, edge.EdgeEntry, edge.EdgeOutbox]


def up(db: peewee.Database) -> None:
    with db.bind_ctx(TABLES):
        db.create_tables(TABLES)
