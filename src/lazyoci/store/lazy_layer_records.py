"""What the lazy pulls recorded: which zTOC serves a layer, and which zTOC each image uses.

Two tables, so that two indexes of one layer never meet:
  `lazy_layers` (layer digest, zTOC digest) -> the reference to fetch spans from and the
      SOCI index it came with: one record per view, as the service keys its views;
  `lazy_image_layers` (image name, manifest digest, layer digest) -> zTOC digest: the
      zTOCs the latest lazy pull of that name gave the image's layers (an image whose
      name was not pulled lazily, e.g. after `tag`, uses those of the latest lazy pull of
      its manifest for the layers it does not hold).
The soci snapshotter, its lazy pull and containerd's remote snapshots write them; the
service reads which reference each view fetches from (`layer`, `pulled_refs`) and, when it
is asked to fetch a view from another reference, records that one (`record_served_ref`).
This is the one record of (layer, index, reference): the service's own table only says
which views it serves (service/view_records.py). All sit above `store/`, so the module lives here.
An image keeps its rows while its name still holds its manifest; `live_views` drops the
others and says which (layer, zTOC) views the remaining images use.

A view's record also says its index's format (`format`: a zTOC, an eStargz or
zstd:chunked TOC; layer_formats.py), written by the pull before it asks the service to
mount and read by the service at every mount, so an index is only ever opened as the
format its own layer was recognised in.

Data roots of an older lazyoci keyed `lazy_layers` by layer digest alone:
`migrate_lazy_layers` rekeys it once and gives each manifest its recorded zTOCs
(under the name "", as no image name was kept). Later ones kept formats in a table of
their own (`lazy_index_formats`): `migrate_index_formats` moves them into `format`.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from lazyoci.store.db import Database

_LAYERS_DDL = """
CREATE TABLE IF NOT EXISTS lazy_layers (
    layer_digest TEXT NOT NULL,
    ztoc_digest TEXT NOT NULL,
    ref TEXT NOT NULL,               -- repository@manifest the spans are fetched from
    index_digest TEXT NOT NULL,      -- the SOCI index the zTOC came with ("": the layer's own index)
    created REAL NOT NULL,
    format TEXT NOT NULL DEFAULT 'ztoc',   -- the index's format, a name of layer_formats.FORMATS
    PRIMARY KEY (layer_digest, ztoc_digest)
)"""
_IMAGES_DDL = """
CREATE TABLE IF NOT EXISTS lazy_image_layers (
    image TEXT NOT NULL,             -- the image name the lazy pull was for ("" after a migration)
    manifest_digest TEXT NOT NULL,
    layer_digest TEXT NOT NULL,
    ztoc_digest TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (image, manifest_digest, layer_digest)
);
CREATE INDEX IF NOT EXISTS lazy_image_layers_manifest ON lazy_image_layers(manifest_digest);
"""
LAZY_RECORDS_DDL = _LAYERS_DDL + ";" + _IMAGES_DDL


@dataclass(frozen=True)
class LazyLayerRecord:
    layer_digest: str
    ztoc_digest: str
    ref: str
    index_digest: str
    format: str = "ztoc"      # how the view's index is read (layer_formats.py); the service opens it as this


def _columns(conn: sqlite3.Connection, table: str) -> list[sqlite3.Row]:
    return conn.execute(f"PRAGMA table_info({table})").fetchall()


def migrate_index_formats(db: Database) -> None:
    """Give a `lazy_layers` table of an older lazyoci its `format` column, filled from the
    table the formats were kept in then (`lazy_index_formats`, a row per view not a zTOC)."""
    with db.reading() as conn:
        has_column = any(r["name"] == "format" for r in _columns(conn, "lazy_layers"))
        has_old = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='lazy_index_formats'"
                               ).fetchone() is not None
    if has_column and not has_old:
        return
    with db.transaction() as conn:
        if not any(r["name"] == "format" for r in _columns(conn, "lazy_layers")):
            conn.execute("ALTER TABLE lazy_layers ADD COLUMN format TEXT NOT NULL DEFAULT 'ztoc'")
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='lazy_index_formats'").fetchone():
            conn.execute("UPDATE lazy_layers SET format = (SELECT f.format FROM lazy_index_formats f "
                         "WHERE f.layer_digest = lazy_layers.layer_digest AND f.index_digest = lazy_layers.ztoc_digest) "
                         "WHERE EXISTS (SELECT 1 FROM lazy_index_formats f WHERE f.layer_digest = lazy_layers.layer_digest "
                         "AND f.index_digest = lazy_layers.ztoc_digest)")
            conn.execute("DROP TABLE lazy_index_formats")


def migrate_lazy_layers(db: Database) -> None:
    """Rekey a `lazy_layers` table of an older lazyoci (layer digest alone) by (layer, zTOC)."""
    with db.reading() as conn:
        pk = [r["name"] for r in conn.execute("PRAGMA table_info(lazy_layers)").fetchall() if r["pk"]]
    if pk != ["layer_digest"]:
        return
    with db.transaction() as conn:
        pk = [r["name"] for r in conn.execute("PRAGMA table_info(lazy_layers)").fetchall() if r["pk"]]
        if pk != ["layer_digest"]:
            return                        # another process migrated it meanwhile
        conn.execute("ALTER TABLE lazy_layers RENAME TO lazy_layers_by_layer")
        conn.execute(_LAYERS_DDL)
        conn.execute("INSERT INTO lazy_layers (layer_digest, ztoc_digest, ref, index_digest, created) "
                     "SELECT layer_digest, ztoc_digest, ref, index_digest, created FROM lazy_layers_by_layer")
        conn.execute("INSERT OR IGNORE INTO lazy_image_layers SELECT '', substr(ref, instr(ref, '@') + 1), "
                     "layer_digest, ztoc_digest, created FROM lazy_layers_by_layer WHERE instr(ref, '@') > 0")
        conn.execute("DROP TABLE lazy_layers_by_layer")


def record_layer(db: Database, rec: LazyLayerRecord) -> None:
    with db.transaction() as conn:
        conn.execute("INSERT OR REPLACE INTO lazy_layers (layer_digest, ztoc_digest, ref, index_digest, created, "
                     "format) VALUES (?, ?, ?, ?, ?, ?)",
                     (rec.layer_digest, rec.ztoc_digest, rec.ref, rec.index_digest, time.time(), rec.format))


def layer_record(db: Database, layer_digest: str, ztoc_digest: str | None = None) -> LazyLayerRecord | None:
    """The record of the layer's view through `ztoc_digest` (None: the latest recorded for the layer)."""
    with db.reading() as conn:
        if ztoc_digest is None:
            row = conn.execute("SELECT * FROM lazy_layers WHERE layer_digest=? ORDER BY created DESC LIMIT 1",
                               (layer_digest,)).fetchone()
        else:
            row = conn.execute("SELECT * FROM lazy_layers WHERE layer_digest=? AND ztoc_digest=?",
                               (layer_digest, ztoc_digest)).fetchone()
    return LazyLayerRecord(row["layer_digest"], row["ztoc_digest"], row["ref"], row["index_digest"],
                           row["format"]) if row else None


def record_served_ref(db: Database, layer_digest: str, ztoc_digest: str, ref: str) -> None:
    """The view is served fetching first from `ref`, which becomes its reference; a view no
    pull recorded (mounted by a direct request) gets a record of its own, with no SOCI index."""
    with db.transaction() as conn:
        cur = conn.execute("UPDATE lazy_layers SET ref=? WHERE layer_digest=? AND ztoc_digest=?",
                           (ref, layer_digest, ztoc_digest))
        if cur.rowcount == 0:
            conn.execute("INSERT INTO lazy_layers (layer_digest, ztoc_digest, ref, index_digest, created) "
                         "VALUES (?, ?, ?, '', ?)",
                         (layer_digest, ztoc_digest, ref, time.time()))


def forget_layer(db: Database, layer_digest: str, ztoc_digest: str) -> None:
    with db.transaction() as conn:
        conn.execute("DELETE FROM lazy_layers WHERE layer_digest=? AND ztoc_digest=?", (layer_digest, ztoc_digest))


def record_image(db: Database, image: str, manifest_digest: str, ztocs: dict[str, str]) -> None:
    """The zTOCs this lazy pull of `image` gave its layers (layer digest -> zTOC), replacing the last pull's."""
    with db.transaction() as conn:
        conn.execute("DELETE FROM lazy_image_layers WHERE image=? AND manifest_digest=?", (image, manifest_digest))
        now = time.time()
        conn.executemany("INSERT INTO lazy_image_layers VALUES (?, ?, ?, ?, ?)",
                         [(image, manifest_digest, layer, ztoc, now) for layer, ztoc in ztocs.items()])


def image_ztocs(db: Database, image: str | None, manifest_digest: str) -> tuple[dict[str, str], bool]:
    """The zTOCs an image's layers are served through, and whether they are the image's own
    (recorded by a lazy pull of that name) rather than those of another name's latest pull."""
    with db.reading() as conn:
        rows = conn.execute("SELECT layer_digest, ztoc_digest FROM lazy_image_layers "
                            "WHERE image=? AND manifest_digest=?", (image or "", manifest_digest)).fetchall()
        if rows:
            return {r[0]: r[1] for r in rows}, True
        latest = conn.execute("SELECT image FROM lazy_image_layers WHERE manifest_digest=? "
                              "ORDER BY created DESC LIMIT 1", (manifest_digest,)).fetchone()
        if latest is None:
            return {}, False
        rows = conn.execute("SELECT layer_digest, ztoc_digest FROM lazy_image_layers "
                            "WHERE image=? AND manifest_digest=?", (latest[0], manifest_digest)).fetchall()
    return {r[0]: r[1] for r in rows}, False


def live_views(db: Database, held: set[tuple[str, str]], present: set[str]) -> set[tuple[str, str]]:
    """Drop the rows of images gone (their name no longer holds their manifest); return the
    (layer, zTOC) views of the rest. Rows without a live name stay while their manifest is
    still an image's and no live name has rows for it (a `tag` of a lazily pulled image).

    `held`: the (name, platform manifest) pairs of the image records, `present`: every
    platform manifest stored (`ImageRecords.named_manifests`)."""
    with db.transaction() as conn:
        rows = conn.execute("SELECT image, manifest_digest, layer_digest, ztoc_digest FROM lazy_image_layers").fetchall()
        named = {r["manifest_digest"] for r in rows if (r["image"], r["manifest_digest"]) in held}
        live: set[tuple[str, str]] = set()
        for r in rows:
            image, manifest = r["image"], r["manifest_digest"]
            if (image, manifest) in held or (manifest in present and manifest not in named):
                live.add((r["layer_digest"], r["ztoc_digest"]))
            else:
                conn.execute("DELETE FROM lazy_image_layers WHERE image=? AND manifest_digest=?", (image, manifest))
    return live


def image_formats(db: Database, image: str) -> set[str]:
    """The formats of the lazy layers the latest lazy pull of `image` (a name) recorded."""
    with db.reading() as conn:
        rows = conn.execute(
            "SELECT DISTINCT coalesce(l.format, 'ztoc') FROM lazy_image_layers i LEFT JOIN lazy_layers l "
            "ON l.layer_digest = i.layer_digest AND l.ztoc_digest = i.ztoc_digest WHERE i.image = ?",
            (image,)).fetchall()
    return {r[0] for r in rows}


def pulled_refs(db: Database, layer_digest: str) -> list[str]:
    """The references the lazy pulls recorded for the layer, the latest first (any zTOC's)."""
    with db.reading() as conn:
        rows = conn.execute("SELECT ref FROM lazy_layers WHERE layer_digest=? ORDER BY created DESC",
                            (layer_digest,)).fetchall()
    return [r[0] for r in rows]


def layer_digests(db: Database) -> set[str]:
    """Every layer a lazy pull recorded a zTOC for."""
    with db.reading() as conn:
        return {r[0] for r in conn.execute("SELECT layer_digest FROM lazy_layers").fetchall()}


class LazyLayerRecords:
    """The records of the lazy pulls over one database, as one object to hand to the soci
    snapshotter and the lazy pull (the module's functions, bound to `db`)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.ensure_schema("lazy_records", LAZY_RECORDS_DDL)
        migrate_lazy_layers(db)
        migrate_index_formats(db)

    def record_layer(self, rec: LazyLayerRecord) -> None:
        record_layer(self.db, rec)

    def layer(self, layer_digest: str, ztoc_digest: str | None = None) -> LazyLayerRecord | None:
        return layer_record(self.db, layer_digest, ztoc_digest)

    def record_served_ref(self, layer_digest: str, ztoc_digest: str, ref: str) -> None:
        record_served_ref(self.db, layer_digest, ztoc_digest, ref)

    def forget_layer(self, layer_digest: str, ztoc_digest: str) -> None:
        forget_layer(self.db, layer_digest, ztoc_digest)

    def record_image(self, image: str, manifest_digest: str, ztocs: dict[str, str]) -> None:
        record_image(self.db, image, manifest_digest, ztocs)

    def image_ztocs(self, image: str | None, manifest_digest: str) -> tuple[dict[str, str], bool]:
        return image_ztocs(self.db, image, manifest_digest)

    def live_views(self, held: set[tuple[str, str]], present: set[str]) -> set[tuple[str, str]]:
        return live_views(self.db, held, present)

    def layer_digests(self) -> set[str]:
        return layer_digests(self.db)

    def pulled_refs(self, layer_digest: str) -> list[str]:
        return pulled_refs(self.db, layer_digest)

    def image_formats(self, image: str) -> set[str]:
        return image_formats(self.db, image)
