"""Slot numbers of lazy views, kept in the database so node IDs outlive the service process.

The kernel holds node IDs and file handles of the FUSE mount (fs/layer_fs.py: a
view's slot in the high 32 bits, the node of its tree below), and a restarted
service takes the mount over (service/session_holder.py): each view must come back
in the slot it had. A view keeps its slot for good, so a slot never names two views.
"""

from __future__ import annotations

from lazyoci.store.db import Database

SCHEMA_NAME = "service_view_slots"
SCHEMA = """
CREATE TABLE IF NOT EXISTS service_view_slots (
    name TEXT PRIMARY KEY,            -- the view's FUSE directory, <layer hex>-<16 hex of the zTOC>
    slot INTEGER NOT NULL UNIQUE      -- 1..2^32-1
);
"""


def view_slot(db: Database, name: str) -> int:
    """The view's slot, given it the first time it is asked for."""
    db.ensure_schema(SCHEMA_NAME, SCHEMA)
    with db.transaction() as conn:
        row = conn.execute("SELECT slot FROM service_view_slots WHERE name=?", (name,)).fetchone()
        if row is not None:
            return int(row[0])
        (top,) = conn.execute("SELECT COALESCE(MAX(slot), 0) FROM service_view_slots").fetchone()
        conn.execute("INSERT INTO service_view_slots VALUES (?, ?)", (name, top + 1))
        return int(top) + 1
