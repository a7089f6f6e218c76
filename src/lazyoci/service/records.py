"""The service's table: which lazy layers it serves (mounted again when it starts).

Kept apart from the daemon code so that the snapshotter can forget layers
without importing FUSE, e.g. when images are removed while the service is down.
"""

from __future__ import annotations

from lazyoci.store.db import Database

SCHEMA_NAME = "service"
SCHEMA = """
CREATE TABLE IF NOT EXISTS service_layers (
    layer_digest TEXT PRIMARY KEY,   -- the lazy layer (its FUSE directory is the hex)
    ref          TEXT NOT NULL,      -- repository the spans are fetched from
    ztoc_digest  TEXT NOT NULL,      -- zTOC blob in <root>/blobs
    mounted_at   REAL NOT NULL
);
"""


def forget_layers(db: Database, layer_digests: list[str]) -> None:
    """Drop layers from the list the service mounts when it starts."""
    db.ensure_schema(SCHEMA_NAME, SCHEMA)
    with db.transaction() as conn:
        conn.executemany("DELETE FROM service_layers WHERE layer_digest=?", [(d,) for d in layer_digests])
