"""The service's table: which lazy views it serves (mounted again when it starts).

Kept apart from the daemon code so that the snapshotter can forget views
without importing FUSE, e.g. when images are removed while the service is down.

A view is keyed by (layer digest, index digest): two indexes of one layer are two
views. Only the fact that the service serves a view is the service's: the reference
its spans come from is in the one record of lazy layers (store/lazy_layer_records.py),
which the service also reads when it mounts the view again.

Older data roots kept the reference here as well: `service_layers` (keyed by the
layer alone), then `service_views` (layer, zTOC, ref). `migrate_view_records` moves
their references into the lazy-layer records and their views into
`service_mounted_views`, once, and drops them.
"""

from __future__ import annotations

from lazyoci.store.db import Database
from lazyoci.store.lazy_layer_records import LazyLayerRecords

SCHEMA_NAME = "service"
SCHEMA = """
CREATE TABLE IF NOT EXISTS service_mounted_views (
    layer_digest TEXT NOT NULL,      -- the lazy layer
    index_digest TEXT NOT NULL,      -- its index blob in <root>/blobs; FUSE dir <layer hex>-<16 hex of it>
    mounted_at   REAL NOT NULL,
    PRIMARY KEY (layer_digest, index_digest)
);
"""
_OLD_TABLES = ("service_layers", "service_views")


def migrate_view_records(db: Database) -> None:
    """Move the views of an older data root's service tables here, their references into the
    lazy-layer records (the reference the service fetched from stays the view's first)."""
    db.ensure_schema(SCHEMA_NAME, SCHEMA)
    with db.reading() as conn:
        old = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name IN (?, ?)", _OLD_TABLES).fetchall()]
        if not old:
            return
        rows = [(r[0], r[1], r[2]) for table in old for r in conn.execute(
            f"SELECT layer_digest, ztoc_digest, ref FROM {table}").fetchall()]
    records = LazyLayerRecords(db)
    for layer_digest, index_digest, ref in rows:       # idempotent: a second process does it again
        records.record_served_ref(layer_digest, index_digest, ref)
    with db.transaction() as conn:
        for table in old:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone():
                conn.execute(f"INSERT OR IGNORE INTO service_mounted_views "
                             f"SELECT layer_digest, ztoc_digest, mounted_at FROM {table}")
                conn.execute(f"DROP TABLE {table}")


def forget_layers(db: Database, views: list[tuple[str, str]]) -> None:
    """Drop (layer digest, index digest) views from the list the service mounts when it starts."""
    migrate_view_records(db)
    with db.transaction() as conn:
        conn.executemany("DELETE FROM service_mounted_views WHERE layer_digest=? AND index_digest=?", views)


def recorded_views(db: Database) -> list[tuple[str, str]]:
    """The (layer digest, index digest) views the service serves, or mounts when it starts."""
    migrate_view_records(db)
    with db.reading() as conn:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT layer_digest, index_digest FROM service_mounted_views ORDER BY mounted_at").fetchall()]


def record_view(db: Database, layer_digest: str, index_digest: str, mounted_at: float) -> None:
    """The service serves this view (mounted again when it starts)."""
    migrate_view_records(db)
    with db.transaction() as conn:
        conn.execute("INSERT OR REPLACE INTO service_mounted_views VALUES (?, ?, ?)",
                     (layer_digest, index_digest, mounted_at))
