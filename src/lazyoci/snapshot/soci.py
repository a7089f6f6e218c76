"""The `soci` snapshotter: layers with a zTOC are served lazily by the lazyoci service.

A committed snapshot of a lazy layer has no directory of its own: its lower is
the layer's directory in the service's FUSE mount (<root>/service/mnt/<hex>),
mounted on demand (`mounts()` starts the service and asks it to mount the layer
if it is not there, e.g. after a reboot). Layers without a zTOC are unpacked as
the overlayfs snapshotter does (B's safe unpack, B's streaming consumer) into
this snapshotter's own directories, so the two snapshotters never free each
other's data.

Layout (<root>/snapshots/soci/): <n>/fs unpacked layers and upper dirs, <n>/work,
empty/ (pads read-only stacks), tmp/ (layers being unpacked).
Database: `lazy_dirs`, `lazy_snapshots` (key -> kind, parent, dir or lazy layer),
`lazy_layers` (layer digest -> zTOC digest, repository, SOCI index), the last
filled by the lazy pull (snapshot/soci_pull.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lazyoci.config import Config
from lazyoci.errors import IntegrityError, StoreError
from lazyoci.oci.manifest import Descriptor, chain_ids
from lazyoci.service.client import ServiceClient
from lazyoci.service.paths import ServicePaths
from lazyoci.snapshot.base import (KIND_ACTIVE, KIND_COMMITTED, KIND_VIEW, LABEL_DIFF_ID,
                                   LABEL_LAYER_DIGEST, Mount, SnapshotInfo)
from lazyoci.snapshot.unpack import apply_layer_stream, remove_tree
from lazyoci.store.db import Database
from lazyoci.store.layout import DataRoot

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService, LocalImage

LABEL_ZTOC = "com.amazon.soci.ztoc-digest"

_DDL = """
CREATE TABLE IF NOT EXISTS lazy_dirs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    diff_id TEXT UNIQUE,             -- unpacked (non-lazy) layers; NULL for upper dirs
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lazy_snapshots (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,              -- committed | active | view
    parent TEXT REFERENCES lazy_snapshots(key),
    dir_id INTEGER REFERENCES lazy_dirs(id),
    lazy_layer TEXT,                 -- committed lazy layer: its digest (lower = FUSE dir)
    labels TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS lazy_snapshots_parent ON lazy_snapshots(parent);
CREATE TABLE IF NOT EXISTS lazy_layers (
    layer_digest TEXT PRIMARY KEY,
    ztoc_digest TEXT NOT NULL,
    ref TEXT NOT NULL,               -- repository@manifest the spans are fetched from
    index_digest TEXT NOT NULL,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class LazyLayerRecord:
    layer_digest: str
    ztoc_digest: str
    ref: str
    index_digest: str


class SociSnapshotter:
    name = "soci"

    def __init__(self, root: DataRoot, config: Config, db: Database | None = None) -> None:
        self.root = root
        self.config = config
        self.dir = root.snapshots / "soci"
        self.db = db or Database(root.db_path)
        self.db.ensure_schema("snapshot_soci", _DDL)
        self.paths = ServicePaths(root)
        self.service = ServiceClient(root, config.path)
        for d in (self.dir / "tmp", self.dir / "empty"):
            d.mkdir(parents=True, exist_ok=True)

    # ---- rows and paths ------------------------------------------------------
    def _fs(self, dir_id: int) -> Path:
        return self.dir / str(dir_id) / "fs"

    def _row(self, conn: sqlite3.Connection, key: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM lazy_snapshots WHERE key=?", (key,)).fetchone()
        if row is None:
            raise StoreError(f"snapshot {key!r} does not exist")
        return row

    def _chain(self, conn: sqlite3.Connection, key: str | None) -> list[sqlite3.Row]:
        """The committed rows of a chain, top first."""
        out = []
        while key is not None:
            row = self._row(conn, key)
            if row["kind"] != KIND_COMMITTED:
                raise StoreError(f"snapshot {key!r} is not committed and cannot be a parent")
            out.append(row)
            key = row["parent"]
        return out

    def _lower(self, row: sqlite3.Row) -> str:
        if row["lazy_layer"]:
            return os.fspath(self.paths.layer_dir(row["lazy_layer"]))
        return os.fspath(self._fs(row["dir_id"]))

    # ---- containerd's calls --------------------------------------------------
    def prepare(self, key: str, parent: str | None, labels: dict[str, str] | None = None) -> list[Mount]:
        with self.db.transaction() as conn:
            self._insert(conn, key, KIND_ACTIVE, parent, labels, own_dir=True)
        return self.mounts(key)

    def view(self, key: str, parent: str | None, labels: dict[str, str] | None = None) -> list[Mount]:
        with self.db.transaction() as conn:
            self._insert(conn, key, KIND_VIEW, parent, labels, own_dir=False)
        return self.mounts(key)

    def _insert(self, conn: sqlite3.Connection, key: str, kind: str, parent: str | None,
                labels: dict[str, str] | None, own_dir: bool) -> None:
        if conn.execute("SELECT 1 FROM lazy_snapshots WHERE key=?", (key,)).fetchone():
            raise StoreError(f"snapshot {key!r} already exists")
        self._chain(conn, parent)
        dir_id = None
        if own_dir:
            dir_id = conn.execute("INSERT INTO lazy_dirs (diff_id, created) VALUES (NULL, ?)",
                                  (time.time(),)).lastrowid
            (self.dir / str(dir_id) / "fs").mkdir(parents=True, mode=0o755)
            (self.dir / str(dir_id) / "work").mkdir(mode=0o700)
        conn.execute("INSERT INTO lazy_snapshots VALUES (?, ?, ?, ?, NULL, ?, ?)",
                     (key, kind, parent, dir_id, json.dumps(labels or {}), time.time()))

    def mounts(self, key: str) -> list[Mount]:
        """Overlay mounts of a snapshot; lazy lowers are made available by the service first."""
        with self.db.reading() as conn:
            row = self._row(conn, key)
            chain = self._chain(conn, row["parent"])
        if row["kind"] == KIND_COMMITTED:
            chain = [row] + chain
        self._ensure_served([r["lazy_layer"] for r in chain if r["lazy_layer"]])
        lowers = [self._lower(r) for r in chain]
        empty = os.fspath(self.dir / "empty")
        if row["kind"] == KIND_ACTIVE:
            n = self.dir / str(row["dir_id"])
            return [Mount("overlay", "overlay", (
                f"lowerdir={':'.join(lowers or [empty])}", f"upperdir={n / 'fs'}", f"workdir={n / 'work'}"))]
        if len(lowers) < 2:
            lowers = lowers + [empty] * (2 - len(lowers))
        return [Mount("overlay", "overlay", (f"lowerdir={':'.join(lowers)}",))]

    def _ensure_served(self, layer_digests: list[str]) -> None:
        """Start the service and mount lazy layers that it does not show (yet)."""
        for digest in layer_digests:
            if os.path.isdir(self.paths.layer_dir(digest)):
                continue
            rec = self.lazy_layer(digest)
            if rec is None:
                raise StoreError(f"lazy layer {digest} has no zTOC record; pull the image again")
            self.service.ensure_running()
            self.service.mount_layer(rec.ref, rec.layer_digest, rec.ztoc_digest)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        with self.db.transaction() as conn:
            row = self._row(conn, key)
            if row["kind"] != KIND_ACTIVE:
                raise StoreError(f"snapshot {key!r} is not active")
            if conn.execute("SELECT 1 FROM lazy_snapshots WHERE key=?", (name,)).fetchone():
                raise StoreError(f"snapshot {name!r} already exists")
            merged = {**json.loads(row["labels"]), **(labels or {})}
            conn.execute("UPDATE lazy_dirs SET diff_id=? WHERE id=?", (merged.get(LABEL_DIFF_ID), row["dir_id"]))
            conn.execute("INSERT INTO lazy_snapshots VALUES (?, ?, ?, ?, NULL, ?, ?)",
                         (name, KIND_COMMITTED, row["parent"], row["dir_id"], json.dumps(merged), time.time()))
            conn.execute("DELETE FROM lazy_snapshots WHERE key=?", (key,))
        shutil.rmtree(self.dir / str(row["dir_id"]) / "work", ignore_errors=True)

    def remove(self, key: str) -> None:
        with self.db.transaction() as conn:
            row = self._row(conn, key)
            if conn.execute("SELECT 1 FROM lazy_snapshots WHERE parent=?", (key,)).fetchone():
                raise StoreError(f"snapshot {key!r} has children")
            conn.execute("DELETE FROM lazy_snapshots WHERE key=?", (key,))
            gone = self._drop_dir_if_unused(conn, row["dir_id"])
        if gone is not None:
            shutil.rmtree(self.dir / str(gone), ignore_errors=True)

    def _drop_dir_if_unused(self, conn: sqlite3.Connection, dir_id: int | None) -> int | None:
        if dir_id is None or conn.execute("SELECT 1 FROM lazy_snapshots WHERE dir_id=?", (dir_id,)).fetchone():
            return None
        conn.execute("DELETE FROM lazy_dirs WHERE id=?", (dir_id,))
        return dir_id

    def stat(self, key: str) -> SnapshotInfo:
        with self.db.reading() as conn:
            return _info(self._row(conn, key))

    def walk(self) -> Iterator[SnapshotInfo]:
        with self.db.reading() as conn:
            rows = conn.execute("SELECT * FROM lazy_snapshots ORDER BY created").fetchall()
        for r in rows:
            yield _info(r)

    # ---- lazy layers -----------------------------------------------------------
    def record_lazy_layer(self, rec: LazyLayerRecord) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO lazy_layers VALUES (?, ?, ?, ?, ?)",
                         (rec.layer_digest, rec.ztoc_digest, rec.ref, rec.index_digest, time.time()))

    def lazy_layer(self, layer_digest: str) -> LazyLayerRecord | None:
        with self.db.reading() as conn:
            row = conn.execute("SELECT * FROM lazy_layers WHERE layer_digest=?", (layer_digest,)).fetchone()
        return LazyLayerRecord(row["layer_digest"], row["ztoc_digest"], row["ref"], row["index_digest"]) if row else None

    def is_lazy(self, key: str) -> bool:
        """True if any layer below `key` is served lazily (what `ps` may call "soci")."""
        with self.db.reading() as conn:
            row = self._row(conn, key)
            chain = self._chain(conn, row["parent"]) + ([row] if row["kind"] == KIND_COMMITTED else [])
        return any(r["lazy_layer"] for r in chain)

    # ---- unpacked layers (B's unpack and streaming consumer) ---------------------
    def layer_dir(self, diff_id: str) -> Path | None:
        with self.db.reading() as conn:
            row = conn.execute("SELECT id FROM lazy_dirs WHERE diff_id=?", (diff_id,)).fetchone()
        return self._fs(row["id"]) if row else None

    def new_staging_dir(self) -> Path:
        staging = Path(tempfile.mkdtemp(dir=self.dir / "tmp"))
        (staging / "fs").mkdir(mode=0o755)
        return staging

    def adopt_layer(self, staging: Path, diff_id: str, layer_digest: str | None = None) -> None:
        """Publish an unpacked layer under its diff ID (B's streaming consumer calls this)."""
        try:
            with self.db.transaction() as conn:
                if conn.execute("SELECT 1 FROM lazy_dirs WHERE diff_id=?", (diff_id,)).fetchone():
                    remove_tree(staging)
                    return
                dir_id = conn.execute("INSERT INTO lazy_dirs (diff_id, created) VALUES (?, ?)",
                                      (diff_id, time.time())).lastrowid
                os.rename(staging, self.dir / str(dir_id))
        except BaseException:
            remove_tree(staging)
            raise

    def unpack_blob(self, images: "ImageService", desc: Descriptor) -> str:
        staging = self.new_staging_dir()
        try:
            with images.blobs.open(desc.digest) as f:
                diff_id = apply_layer_stream(f, desc.media_type, staging / "fs")
        except BaseException:
            remove_tree(staging)
            raise
        self.adopt_layer(staging, diff_id)
        return diff_id

    def layer_consumer(self, desc: Descriptor):
        from lazyoci.snapshot.streaming import UnpackingConsumer

        return UnpackingConsumer(self, desc)    # uses new_staging_dir / adopt_layer only

    def unpack_image(self, images: "ImageService", image: "LocalImage") -> str | None:
        """Commit the image's layer snapshots: lazy where a zTOC is recorded, else unpacked."""
        diff_ids = image.config.diff_ids
        if len(diff_ids) != len(image.manifest.layers):
            raise IntegrityError(f"image config lists {len(diff_ids)} diff IDs for "
                                 f"{len(image.manifest.layers)} layers")
        parent: str | None = None
        for desc, diff_id, chain in zip(image.manifest.layers, diff_ids, chain_ids(diff_ids)):
            with self.db.reading() as conn:
                have = conn.execute("SELECT 1 FROM lazy_snapshots WHERE key=?", (chain,)).fetchone()
            if not have:
                labels = {LABEL_LAYER_DIGEST: desc.digest, LABEL_DIFF_ID: diff_id}
                rec = self.lazy_layer(desc.digest)
                if rec is not None and images.blobs.has(rec.ztoc_digest):
                    labels[LABEL_ZTOC] = rec.ztoc_digest
                    self._commit_layer(chain, parent, None, desc.digest, labels)
                else:
                    if self.layer_dir(diff_id) is None:
                        if not images.blobs.has(desc.digest):
                            raise StoreError(f"layer {desc.digest} was neither downloaded nor indexed; "
                                             f"pull the image again")
                        got = self.unpack_blob(images, desc)
                        if got != diff_id:
                            raise IntegrityError(f"layer {desc.digest} unpacks to diff ID {got}, the image "
                                                 f"config says {diff_id}", expected=diff_id, actual=got)
                    self._commit_layer(chain, parent, diff_id, None, labels)
            parent = chain
        return parent

    def _commit_layer(self, chain: str, parent: str | None, diff_id: str | None, lazy: str | None,
                      labels: dict[str, str]) -> None:
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM lazy_snapshots WHERE key=?", (chain,)).fetchone():
                return
            dir_id = None
            if diff_id is not None:
                row = conn.execute("SELECT id FROM lazy_dirs WHERE diff_id=?", (diff_id,)).fetchone()
                if row is None:
                    raise StoreError(f"layer {diff_id} vanished while being committed")
                dir_id = row["id"]
            conn.execute("INSERT INTO lazy_snapshots VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (chain, KIND_COMMITTED, parent, dir_id, lazy, json.dumps(labels), time.time()))

    def release_unused(self, keep: set[str]) -> list[str]:
        """Remove committed snapshots nothing needs; unmount lazy layers no snapshot uses."""
        removed: list[str] = []
        dirs: list[int] = []
        with self.db.transaction() as conn:
            while True:
                rows = conn.execute(
                    "SELECT key FROM lazy_snapshots s WHERE kind=? AND NOT EXISTS "
                    "(SELECT 1 FROM lazy_snapshots c WHERE c.parent = s.key)", (KIND_COMMITTED,)).fetchall()
                victims = [r["key"] for r in rows if r["key"] not in keep]
                if not victims:
                    break
                for k in victims:
                    conn.execute("DELETE FROM lazy_snapshots WHERE key=?", (k,))
                    removed.append(k)
            for r in conn.execute("SELECT id FROM lazy_dirs d WHERE NOT EXISTS "
                                  "(SELECT 1 FROM lazy_snapshots s WHERE s.dir_id = d.id)").fetchall():
                conn.execute("DELETE FROM lazy_dirs WHERE id=?", (r["id"],))
                dirs.append(r["id"])
            unused = [r["layer_digest"] for r in conn.execute(
                "SELECT layer_digest FROM lazy_layers l WHERE NOT EXISTS "
                "(SELECT 1 FROM lazy_snapshots s WHERE s.lazy_layer = l.layer_digest)").fetchall()]
        for d in dirs:
            shutil.rmtree(self.dir / str(d), ignore_errors=True)
        if unused:
            if self.service.is_running():
                for digest in unused:
                    self.service.unmount_layer(digest)
            else:
                from lazyoci.service.records import forget_layers
                forget_layers(self.db, unused)
        return removed

    # ---- the lazy pull -------------------------------------------------------------
    def pull(self, images: "ImageService", ref: str, platform=None, progress=None, log=None,
             index_digest: str | None = None) -> "LocalImage":
        """`pull --snapshotter soci`: see lazyoci.snapshot.soci_pull (`log` None: INFO lines go to stderr)."""
        from lazyoci.snapshot.soci_pull import lazy_pull

        return lazy_pull(self, images, ref, platform, progress, log, index_digest)


def _info(row: sqlite3.Row) -> SnapshotInfo:
    return SnapshotInfo(row["key"], row["kind"], row["parent"], json.loads(row["labels"]), row["created"])
