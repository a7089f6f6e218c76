"""The `soci` snapshotter: layers with a zTOC are served lazily by the lazyoci service.

A committed snapshot of a lazy layer has no directory of its own: its lower is
the layer's view through the snapshot's zTOC (label com.amazon.soci.ztoc-digest)
in the service's FUSE mount (<root>/service/mnt/<layer hex>-<16 hex of the zTOC>),
mounted on demand (`mounts()` starts the service and asks it to mount the layer
if it is not there, e.g. after a reboot). Layers without a zTOC fall back to the
shared unpack path of lazyoci.snapshot.layered (safe unpack, streaming consumer)
into this snapshotter's own directories, so the two snapshotters never free each
other's data. Everything else (records, mounts, release) is that shared mechanism.

Layout: <root>/snapshots/soci/ (as in layered.py). Database: `lazy_dirs`,
`lazy_snapshots` (plus `lazy_layer`: the digest of a committed lazy layer),
`lazy_layer_digests`, and `lazy_layers` (layer digest -> zTOC digest, repository,
SOCI index), the last filled by the lazy pull (snapshot/soci_pull.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazyoci.config import Config
from lazyoci.errors import StoreError
from lazyoci.oci.manifest import Descriptor
from lazyoci.service.client import ServiceClient
from lazyoci.service.paths import ServicePaths
from lazyoci.snapshot.base import KIND_COMMITTED, LABEL_DIFF_ID, LABEL_LAYER_DIGEST
from lazyoci.snapshot.layered import LayeredSnapshotter
from lazyoci.store.db import Database
from lazyoci.store.layout import DataRoot

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService, LocalImage

LABEL_ZTOC = "com.amazon.soci.ztoc-digest"

_LAZY_LAYERS_DDL = """
CREATE TABLE IF NOT EXISTS lazy_layers (
    layer_digest TEXT PRIMARY KEY,
    ztoc_digest TEXT NOT NULL,
    ref TEXT NOT NULL,               -- repository@manifest the spans are fetched from
    index_digest TEXT NOT NULL,
    created REAL NOT NULL
);
"""


def _ztoc_of(row: sqlite3.Row) -> str:
    """The zTOC a committed lazy snapshot was made with (its view in the FUSE mount)."""
    ztoc = json.loads(row["labels"] or "{}").get(LABEL_ZTOC)
    if not ztoc:
        raise StoreError(f"lazy snapshot {row['key']} has no zTOC label; pull the image again")
    return ztoc


@dataclass(frozen=True)
class LazyLayerRecord:
    layer_digest: str
    ztoc_digest: str
    ref: str
    index_digest: str


class SociSnapshotter(LayeredSnapshotter):
    name = "soci"
    dir_name = "soci"
    table_prefix = "lazy"
    schema_name = "snapshot_soci"
    extra_snapshot_columns = "lazy_layer TEXT,   -- committed lazy layer: its digest (lower = FUSE dir)"
    extra_ddl = _LAZY_LAYERS_DDL

    def __init__(self, root: DataRoot, config: Config, db: Database | None = None) -> None:
        self.config = config
        self.paths = ServicePaths(root)
        self.service = ServiceClient(root, config.path)
        super().__init__(root, db)

    # ---- where a lazy layer's lower comes from ---------------------------------
    def _lower(self, row: sqlite3.Row) -> str:
        if row["lazy_layer"]:
            return os.fspath(self.paths.layer_dir(row["lazy_layer"], _ztoc_of(row)))
        return super()._lower(row)

    def _make_available(self, chain: list[sqlite3.Row]) -> None:
        self._ensure_served([(r["lazy_layer"], _ztoc_of(r)) for r in chain if r["lazy_layer"]])

    def _ensure_served(self, views: list[tuple[str, str]]) -> None:
        """Start the service and mount the (layer, zTOC) views that it does not show (yet)."""
        for digest, ztoc_digest in views:
            if os.path.isdir(self.paths.layer_dir(digest, ztoc_digest)):
                continue
            rec = self.lazy_layer(digest)
            if rec is None:
                raise StoreError(f"lazy layer {digest} has no zTOC record; pull the image again")
            self.service.ensure_running()
            self.service.mount_layer(rec.ref, digest, ztoc_digest)

    # ---- lazy layers -----------------------------------------------------------
    def record_lazy_layer(self, rec: LazyLayerRecord) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO lazy_layers VALUES (?, ?, ?, ?, ?)",
                         (rec.layer_digest, rec.ztoc_digest, rec.ref, rec.index_digest, time.time()))

    def lazy_layer(self, layer_digest: str) -> LazyLayerRecord | None:
        with self.db.reading() as conn:
            row = conn.execute("SELECT * FROM lazy_layers WHERE layer_digest=?", (layer_digest,)).fetchone()
        return LazyLayerRecord(row["layer_digest"], row["ztoc_digest"], row["ref"], row["index_digest"]) if row else None

    def forget_lazy_layer(self, layer_digest: str) -> None:
        """The layer is no longer lazy (its zTOC was refused): it is committed from its blob."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM lazy_layers WHERE layer_digest=?", (layer_digest,))

    def is_lazy(self, key: str) -> bool:
        """True if any layer below `key` is served lazily (what `ps` may call "soci")."""
        with self.db.reading() as conn:
            row = self._row(conn, key)
            chain = self._chain(conn, row["parent"]) + ([row] if row["kind"] == KIND_COMMITTED else [])
        return any(r["lazy_layer"] for r in chain)

    def _commit_image_layer(self, images: "ImageService", desc: Descriptor, diff_id: str,
                            chain: str, parent: str | None) -> None:
        """Lazy where a zTOC is recorded (and stored), else the shared unpack path."""
        rec = self.lazy_layer(desc.digest)
        if rec is not None and images.blobs.has(rec.ztoc_digest):
            labels = {LABEL_LAYER_DIGEST: desc.digest, LABEL_DIFF_ID: diff_id, LABEL_ZTOC: rec.ztoc_digest}
            self._commit_layer(chain, parent, None, labels, {"lazy_layer": desc.digest})
            return
        if self.layer_dir(diff_id) is None and not images.blobs.has(desc.digest):
            raise StoreError(f"layer {desc.digest} was neither downloaded nor indexed; pull the image again")
        super()._commit_image_layer(images, desc, diff_id, chain, parent)

    def release_unused(self, keep: set[str]) -> list[str]:
        """Release as the shared mechanism does; then unmount the (layer, zTOC) views of lazy
        layers that no snapshot uses (also a layer's view through another index than the one
        its snapshots use)."""
        from lazyoci.service.records import recorded_views

        removed = super().release_unused(keep)
        with self.db.reading() as conn:
            used = {(r["lazy_layer"], json.loads(r["labels"] or "{}").get(LABEL_ZTOC)) for r in conn.execute(
                "SELECT lazy_layer, labels FROM lazy_snapshots WHERE lazy_layer IS NOT NULL").fetchall()}
            ours = {r[0] for r in conn.execute("SELECT layer_digest FROM lazy_layers").fetchall()}
        unused = [v for v in recorded_views(self.db) if v[0] in ours and v not in used]
        if unused:
            if self.service.is_running():
                for digest, ztoc_digest in unused:
                    self.service.unmount_layer(digest, ztoc_digest)
            else:
                from lazyoci.service.records import forget_layers
                forget_layers(self.db, unused)
        return removed

    # ---- the lazy pull -------------------------------------------------------------
    def pull(self, images: "ImageService", ref: str, platform=None, progress=None,
             index_digest: str | None = None, log=None) -> "LocalImage":
        """`pull --snapshotter soci`: see lazyoci.snapshot.soci_pull (`log` None: INFO lines go to stderr)."""
        from lazyoci.snapshot.soci_pull import lazy_pull

        return lazy_pull(self, images, ref, platform, progress, log, index_digest)
