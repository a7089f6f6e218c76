"""The service's table: which lazy layers it serves (mounted again when it starts).

Kept apart from the daemon code so that the snapshotter can forget layers
without importing FUSE, e.g. when images are removed while the service is down.

A view is keyed by (layer digest, zTOC digest): two indexes of one layer are two
views. The first version of the table (`service_layers`, keyed by the layer
digest alone) is copied into `service_views` and dropped.
"""

from __future__ import annotations

from lazyoci.store.db import Database

SCHEMA_NAME = "service"
SCHEMA = """
CREATE TABLE IF NOT EXISTS service_views (
    layer_digest TEXT NOT NULL,      -- the lazy layer
    ztoc_digest  TEXT NOT NULL,      -- zTOC blob in <root>/blobs; FUSE dir <layer hex>-<16 hex of it>
    ref          TEXT NOT NULL,      -- repository the spans were first fetched from
    mounted_at   REAL NOT NULL,
    PRIMARY KEY (layer_digest, ztoc_digest)
);
CREATE TABLE IF NOT EXISTS service_layers (
    layer_digest TEXT PRIMARY KEY, ref TEXT NOT NULL, ztoc_digest TEXT NOT NULL, mounted_at REAL NOT NULL
);
INSERT OR IGNORE INTO service_views (layer_digest, ztoc_digest, ref, mounted_at)
    SELECT layer_digest, ztoc_digest, ref, mounted_at FROM service_layers;
DROP TABLE service_layers;
"""


def forget_layers(db: Database, views: list[tuple[str, str]]) -> None:
    """Drop (layer digest, zTOC digest) views from the list the service mounts when it starts."""
    db.ensure_schema(SCHEMA_NAME, SCHEMA)
    with db.transaction() as conn:
        conn.executemany("DELETE FROM service_views WHERE layer_digest=? AND ztoc_digest=?", views)


def recorded_views(db: Database) -> list[tuple[str, str]]:
    """The (layer digest, zTOC digest) views the service serves, or mounts when it starts."""
    db.ensure_schema(SCHEMA_NAME, SCHEMA)
    with db.reading() as conn:
        return [(r[0], r[1]) for r in conn.execute("SELECT layer_digest, ztoc_digest FROM service_views").fetchall()]


def record_view(db: Database, layer_digest: str, ztoc_digest: str, ref: str, mounted_at: float) -> None:
    """The service serves this view (mounted again when it starts), fetching first from `ref`."""
    with db.transaction() as conn:
        conn.execute("INSERT OR REPLACE INTO service_views VALUES (?, ?, ?, ?)",
                     (layer_digest, ztoc_digest, ref, mounted_at))


def set_view_ref(db: Database, layer_digest: str, ztoc_digest: str, ref: str) -> None:
    """The view's recorded reference becomes `ref` (the image was pulled again, maybe from elsewhere)."""
    with db.transaction() as conn:
        conn.execute("UPDATE service_views SET ref=? WHERE layer_digest=? AND ztoc_digest=?",
                     (ref, layer_digest, ztoc_digest))


def recorded_view_refs(db: Database) -> list[tuple[str, str, str]]:
    """(layer digest, zTOC digest, reference) of every view the service mounts when it starts."""
    db.ensure_schema(SCHEMA_NAME, SCHEMA)
    with db.reading() as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute(
            "SELECT layer_digest, ztoc_digest, ref FROM service_views").fetchall()]
