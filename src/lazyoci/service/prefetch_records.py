"""Which prefetch artifact goes with a lazy layer's view: written by the lazy pull, read at mount.

A view is (layer digest, zTOC digest); its artifact's span numbers are those of that zTOC (the
index that gave the zTOC gave the artifact). The artifact itself is a blob in the store; the
service verifies its digest before it uses it. The latest pull of a view decides its artifact.
"""

from __future__ import annotations

from lazyoci.store.db import Database

SCHEMA_NAME = "service_prefetch"
SCHEMA = """
CREATE TABLE IF NOT EXISTS service_prefetch (
    layer_digest    TEXT NOT NULL,
    ztoc_digest     TEXT NOT NULL,
    artifact_digest TEXT NOT NULL,      -- a blob in <root>/blobs (media type soci.prefetch.v1+json)
    PRIMARY KEY (layer_digest, ztoc_digest)
);
"""


def record_prefetch(db: Database, layer_digest: str, ztoc_digest: str, artifact_digest: str | None) -> None:
    """Make `artifact_digest` the view's prefetch artifact (None: the view has none any more)."""
    db.ensure_schema(SCHEMA_NAME, SCHEMA)
    with db.transaction() as conn:
        if artifact_digest is None:
            conn.execute("DELETE FROM service_prefetch WHERE layer_digest=? AND ztoc_digest=?",
                         (layer_digest, ztoc_digest))
        else:
            conn.execute("INSERT OR REPLACE INTO service_prefetch VALUES (?, ?, ?)",
                         (layer_digest, ztoc_digest, artifact_digest))


def prefetch_artifact(db: Database, layer_digest: str, ztoc_digest: str) -> str | None:
    """The digest of the view's prefetch artifact, or None."""
    db.ensure_schema(SCHEMA_NAME, SCHEMA)
    with db.reading() as conn:
        row = conn.execute("SELECT artifact_digest FROM service_prefetch WHERE layer_digest=? AND ztoc_digest=?",
                           (layer_digest, ztoc_digest)).fetchone()
    return row[0] if row else None
