"""SOCI records in the data root's SQLite database: which zTOC indexes which layer,
which SOCI index serves which image manifest.

The zTOC table is what makes a zTOC reusable: a layer digest and span size name
exactly one zTOC (the reference keys its artifacts the same way). The blobs
themselves live in the blob store; a record whose blob went missing is ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from lazyoci.store.db import Database
from lazyoci.store.image_records import add_blob_owner, drop_blob_owner

_DDL = """
CREATE TABLE IF NOT EXISTS soci_ztocs (
    layer_digest     TEXT NOT NULL,
    span_size        INTEGER NOT NULL,
    ztoc_digest      TEXT NOT NULL,
    ztoc_size        INTEGER NOT NULL,
    layer_media_type TEXT NOT NULL,
    layer_size       INTEGER NOT NULL,
    created_at       REAL NOT NULL,
    PRIMARY KEY (layer_digest, span_size)
);
CREATE TABLE IF NOT EXISTS soci_indexes (
    index_digest     TEXT NOT NULL,
    manifest_digest  TEXT NOT NULL,
    image_digest     TEXT NOT NULL,
    image_name       TEXT,
    platform         TEXT NOT NULL,
    version          TEXT NOT NULL,
    size             INTEGER NOT NULL,
    origin           TEXT NOT NULL,      -- 'built' here or 'fetched' from a registry
    created_at       REAL NOT NULL,
    PRIMARY KEY (index_digest, manifest_digest)
);
CREATE INDEX IF NOT EXISTS soci_indexes_by_manifest ON soci_indexes (manifest_digest);
"""


def owner_of(index_digest: str) -> str:
    return f"soci:{index_digest}"


@dataclass(frozen=True)
class ZtocRecord:
    layer_digest: str
    span_size: int
    ztoc_digest: str
    ztoc_size: int
    layer_media_type: str
    layer_size: int
    created_at: float


@dataclass(frozen=True)
class IndexRecord:
    index_digest: str
    manifest_digest: str
    image_digest: str
    image_name: str | None
    platform: str
    version: str
    size: int
    origin: str
    created_at: float


class SociRecords:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.ensure_schema("soci", _DDL)

    def find_ztoc(self, layer_digest: str, span_size: int) -> ZtocRecord | None:
        with self.db.reading() as c:
            row = c.execute("SELECT * FROM soci_ztocs WHERE layer_digest=? AND span_size=?",
                            (layer_digest, span_size)).fetchone()
        return ZtocRecord(**dict(row)) if row else None

    def put_ztoc(self, rec: ZtocRecord) -> None:
        with self.db.transaction() as c:
            c.execute("INSERT OR REPLACE INTO soci_ztocs VALUES (?,?,?,?,?,?,?)",
                      (rec.layer_digest, rec.span_size, rec.ztoc_digest, rec.ztoc_size,
                       rec.layer_media_type, rec.layer_size, rec.created_at))

    def ztocs(self, ztoc_digest: str | None = None) -> list[ZtocRecord]:
        with self.db.reading() as c:
            if ztoc_digest:
                rows = c.execute("SELECT * FROM soci_ztocs WHERE ztoc_digest=? ORDER BY created_at",
                                 (ztoc_digest,)).fetchall()
            else:
                rows = c.execute("SELECT * FROM soci_ztocs ORDER BY created_at").fetchall()
        return [ZtocRecord(**dict(r)) for r in rows]

    def put_index(self, index_digest: str, manifest_digest: str, image_digest: str,
                  image_name: str | None, platform: str, version: str, size: int, origin: str) -> IndexRecord:
        rec = IndexRecord(index_digest, manifest_digest, image_digest, image_name, platform, version,
                          size, origin, time.time())
        with self.db.transaction() as c:
            c.execute("INSERT OR REPLACE INTO soci_indexes VALUES (?,?,?,?,?,?,?,?,?)",
                      (rec.index_digest, rec.manifest_digest, rec.image_digest, rec.image_name,
                       rec.platform, rec.version, rec.size, rec.origin, rec.created_at))
        return rec

    def indexes(self, manifest_digest: str | None = None, index_digest: str | None = None) -> list[IndexRecord]:
        """Index records, oldest first (the newest for a manifest is the one `soci push` sends)."""
        q, args = "SELECT * FROM soci_indexes", []
        conds = []
        if manifest_digest:
            conds.append("manifest_digest=?")
            args.append(manifest_digest)
        if index_digest:
            conds.append("index_digest=?")
            args.append(index_digest)
        if conds:
            q += " WHERE " + " AND ".join(conds)
        with self.db.reading() as c:
            rows = c.execute(q + " ORDER BY created_at", args).fetchall()
        return [IndexRecord(**dict(r)) for r in rows]

    def remove_index(self, index_digest: str, manifest_digest: str | None = None) -> int:
        """Forget an index (for one manifest, or entirely, then its blobs become garbage)."""
        with self.db.transaction() as c:
            if manifest_digest:
                return c.execute("DELETE FROM soci_indexes WHERE index_digest=? AND manifest_digest=?",
                                 (index_digest, manifest_digest)).rowcount
            n = c.execute("DELETE FROM soci_indexes WHERE index_digest=?", (index_digest,)).rowcount
            drop_blob_owner(c, owner_of(index_digest))
            return n

    def own(self, index_digest: str, digests: set[str]) -> None:
        """The index holds its blobs (itself, its config, its zTOCs) against garbage collection,
        through the store's generic `blob_refs` table (owner ``soci:<index digest>``)."""
        with self.db.transaction() as c:
            add_blob_owner(c, owner_of(index_digest), sorted(digests | {index_digest}))

    def remove_ztoc(self, ztoc_digest: str) -> int:
        with self.db.transaction() as c:
            return c.execute("DELETE FROM soci_ztocs WHERE ztoc_digest=?", (ztoc_digest,)).rowcount

    def prune(self, has_blob: Callable[[str], bool]) -> int:
        """Drop records whose blob is gone (after gc took an index's zTOCs away)."""
        gone_z = [r.ztoc_digest for r in self.ztocs() if not has_blob(r.ztoc_digest)]
        gone_i = [r.index_digest for r in self.indexes() if not has_blob(r.index_digest)]
        with self.db.transaction() as c:
            c.executemany("DELETE FROM soci_ztocs WHERE ztoc_digest=?", [(d,) for d in gone_z])
            c.executemany("DELETE FROM soci_indexes WHERE index_digest=?", [(d,) for d in gone_i])
        return len(gone_z) + len(gone_i)

    def referenced_blobs(self) -> set[str]:
        """Every zTOC and index digest recorded (what a garbage collector must keep)."""
        with self.db.reading() as c:
            out = {r[0] for r in c.execute("SELECT ztoc_digest FROM soci_ztocs")}
            out |= {r[0] for r in c.execute("SELECT index_digest FROM soci_indexes")}
        return out
