"""Snapshots as overlayfs stacks of layer directories, recorded in SQLite: the mechanism
that the overlayfs and soci snapshotters share, so that it exists (and is fixed) once.

Both follow containerd's model (committed snapshots keyed by chain ID, active and view
snapshots on top of them, overlay mounts) and both unpack layers the same way. A
subclass names its directory and tables and says only what differs: where a committed
layer's directory comes from (`_lower`, `_make_available`) and how one layer of an
image becomes a committed snapshot (`_commit_image_layer`).

Layout (<root>/snapshots/<dir_name>/):
    <n>/fs          a layer's unpacked tree (committed) or a container's upper dir (active)
    <n>/work        overlay's work dir (active only)
    empty/          an empty lower, so that one-layer stacks are overlays too (whiteouts stay hidden)
    tmp/            layers being unpacked, named <pid>.<x> (renamed to <n> when complete)

Database (<p> = table_prefix): `<p>_dirs` (one row per <n>; committed layers carry
their diff ID, unique: a layer is unpacked once and shared by every image and chain
that has it), `<p>_snapshots` (key -> kind, parent key, dir), `<p>_layer_digests`
(compressed layer digest -> the diff ID it unpacked to). Committed snapshots are keyed
by chain ID, so two images sharing a base share its snapshots too.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lazyoci import libc
from lazyoci.errors import IntegrityError, StoreError
from lazyoci.oci.manifest import Descriptor, chain_ids
from lazyoci.snapshot.base import (KIND_ACTIVE, KIND_COMMITTED, KIND_VIEW, LABEL_DIFF_ID,
                                   LABEL_LAYER_DIGEST, Mount, SnapshotInfo)
from lazyoci.store.blobs import BlobStore
from lazyoci.store.db import Database
from lazyoci.store.layout import DataRoot
from lazyoci.store.modes import private_dir

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService, LocalImage
    from lazyoci.snapshot.unpacking_consumer import UnpackingConsumer

ORPHAN_GRACE_SECONDS = 3600   # unpacked layers no snapshot has used yet: a pull may be running


def _ddl(p: str, extra_snapshot_columns: str) -> str:
    """The tables of one snapshotter (`p`: its prefix; names are constants, never input)."""
    return f"""
CREATE TABLE IF NOT EXISTS {p}_dirs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    diff_id TEXT UNIQUE,            -- set for unpacked layers; NULL for upper dirs
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS {p}_snapshots (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,             -- committed | active | view
    parent TEXT REFERENCES {p}_snapshots(key),
    dir_id INTEGER REFERENCES {p}_dirs(id),   -- NULL without a dir of its own (views, served layers)
    {extra_snapshot_columns}
    labels TEXT NOT NULL DEFAULT '{{}}',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS {p}_snapshots_parent ON {p}_snapshots(parent);
CREATE TABLE IF NOT EXISTS {p}_layer_digests (   -- compressed layer digest -> diff ID it unpacked to
    digest TEXT PRIMARY KEY,
    diff_id TEXT NOT NULL
);
"""


def topmost_once(lowers: list[str]) -> list[str]:
    """Each lower directory once, at its topmost place (lowers are listed top first).

    An image may have the same layer twice; a lazy layer is then the same directory twice, which
    overlayfs refuses (ELOOP). Dropping the lower copy changes nothing that shows: every name, whiteout
    and opaque marker it has, the copy above has too, and that one decides."""
    return list(dict.fromkeys(lowers))     # dicts keep the first insertion's place


class LayeredSnapshotter:
    """containerd's snapshotter calls over SQLite records and layer dirs stacked by overlayfs."""

    name: str
    dir_name: str                      # <root>/snapshots/<dir_name>
    table_prefix: str                  # <p>_dirs, <p>_snapshots, <p>_layer_digests
    schema_name: str                   # this snapshotter's entry in schema_versions
    extra_snapshot_columns: str = ""   # DDL of columns a subclass adds to <p>_snapshots
    extra_ddl: str = ""                # DDL of tables a subclass adds

    def __init__(self, root: DataRoot, db: Database | None = None, blobs: BlobStore | None = None,
                 sync_fs: bool = False) -> None:
        """`sync_fs`: flush each unpacked layer to disk before it is published (the config's
        `unpack_sync_fs`)."""
        self.root = root
        self.sync_fs = sync_fs
        self.dir = root.snapshots / self.dir_name
        self.db = db or Database(root.db_path)
        self.blobs = blobs or BlobStore(root)     # where the layers of images are read from
        p = self.table_prefix
        self._dirs, self._snaps, self._digests = f"{p}_dirs", f"{p}_snapshots", f"{p}_layer_digests"
        self.db.ensure_schema(self.schema_name, _ddl(p, self.extra_snapshot_columns) + self.extra_ddl)
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        for d in (self.dir, self.dir / "tmp", self.dir / "empty"):
            private_dir(d)          # 0700 whatever the umask of the process that made them
        self._remove_abandoned_staging()

    def _remove_abandoned_staging(self) -> None:
        """Partial unpacks of processes that died (crash, kill -9) are named <pid>.<x>: remove them."""
        for p in (self.dir / "tmp").iterdir():
            pid = p.name.split(".", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(p, ignore_errors=True)

    # ---- paths and rows -------------------------------------------------
    def _fs(self, dir_id: int) -> Path:
        return self.dir / str(dir_id) / "fs"

    def _row(self, conn: sqlite3.Connection, key: str) -> sqlite3.Row:
        row = conn.execute(f"SELECT * FROM {self._snaps} WHERE key=?", (key,)).fetchone()
        if row is None:
            raise StoreError(f"snapshot {key!r} does not exist")
        return row

    def _exists(self, conn: sqlite3.Connection, key: str) -> bool:
        return conn.execute(f"SELECT 1 FROM {self._snaps} WHERE key=?", (key,)).fetchone() is not None

    def _chain(self, conn: sqlite3.Connection, key: str | None) -> list[sqlite3.Row]:
        """The committed rows of a chain, top first."""
        out: list[sqlite3.Row] = []
        while key is not None:
            row = self._row(conn, key)
            if row["kind"] != KIND_COMMITTED:
                raise StoreError(f"snapshot {key!r} is not committed and cannot be a parent")
            out.append(row)
            key = row["parent"]
        return out

    def _lower(self, row: sqlite3.Row) -> str:
        """The directory a committed snapshot contributes to an overlay's lowerdir."""
        return str(self._fs(row["dir_id"]))

    def _make_available(self, chain: list[sqlite3.Row]) -> None:
        """Called before the lowers of `chain` are mounted (a subclass may have to serve them)."""

    def _new_dir(self, conn: sqlite3.Connection, diff_id: str | None = None) -> int:
        row_id = conn.execute(f"INSERT INTO {self._dirs} (diff_id, created) VALUES (?, ?)",
                              (diff_id, time.time())).lastrowid
        if row_id is None:      # sqlite3 sets it after every INSERT of one row
            raise StoreError(f"no row id for a new snapshot directory in {self._dirs}")
        return row_id

    def _insert_row(self, conn: sqlite3.Connection, key: str, kind: str, parent: str | None,
                    dir_id: int | None, labels: dict[str, str] | None,
                    extra: dict[str, str] | None = None) -> None:
        """One snapshot row; `extra`: values of a subclass's own columns (names are constants)."""
        cols = {"key": key, "kind": kind, "parent": parent, "dir_id": dir_id,
                "labels": json.dumps(labels or {}), "created": time.time(), **(extra or {})}
        conn.execute(f"INSERT INTO {self._snaps} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                     tuple(cols.values()))

    # ---- containerd's calls --------------------------------------------
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
        if self._exists(conn, key):
            raise StoreError(f"snapshot {key!r} already exists")
        self._chain(conn, parent)  # the parent must exist and be committed
        dir_id = None
        if own_dir:
            dir_id = self._new_dir(conn)
            (self.dir / str(dir_id) / "fs").mkdir(parents=True, mode=0o755)
            os.chmod(self.dir / str(dir_id) / "fs", 0o755)     # the container's "/": not our umask's
            (self.dir / str(dir_id) / "work").mkdir(mode=0o700)
        self._insert_row(conn, key, kind, parent, dir_id, labels)

    def mounts(self, key: str) -> list[Mount]:
        """The overlay mount of a snapshot (its lowers made available first)."""
        with self.db.reading() as conn:
            row = self._row(conn, key)
            chain = self._chain(conn, row["parent"])
        if row["kind"] == KIND_COMMITTED:
            chain = [row] + chain
        self._make_available(chain)
        lowers = topmost_once([self._lower(r) for r in chain])
        empty = str(self.dir / "empty")
        if row["kind"] == KIND_ACTIVE:
            n = self.dir / str(row["dir_id"])
            return [Mount("overlay", "overlay", (
                f"lowerdir={':'.join(lowers or [empty])}", f"upperdir={n / 'fs'}", f"workdir={n / 'work'}"))]
        # Read-only: an overlay needs two lowers without an upper; the empty dir pads.
        if len(lowers) < 2:
            lowers = lowers + [empty] * (2 - len(lowers))
        return [Mount("overlay", "overlay", (f"lowerdir={':'.join(lowers)}",))]

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        """Turn an active snapshot into the committed snapshot `name` (its upper dir becomes the layer;
        with `sync_fs`, flushed to disk first)."""
        if self.sync_fs:
            with self.db.reading() as conn:
                dir_id = self._row(conn, key)["dir_id"]
            if dir_id is not None:
                libc.syncfs(str(self._fs(dir_id)))
        with self.db.transaction() as conn:
            row = self._row(conn, key)
            if row["kind"] != KIND_ACTIVE:
                raise StoreError(f"snapshot {key!r} is not active")
            if self._exists(conn, name):
                raise StoreError(f"snapshot {name!r} already exists")
            merged = {**json.loads(row["labels"]), **(labels or {})}
            conn.execute(f"UPDATE {self._dirs} SET diff_id=? WHERE id=?", (merged.get(LABEL_DIFF_ID), row["dir_id"]))
            self._insert_row(conn, name, KIND_COMMITTED, row["parent"], row["dir_id"], merged)
            conn.execute(f"DELETE FROM {self._snaps} WHERE key=?", (key,))
        shutil.rmtree(self.dir / str(row["dir_id"]) / "work", ignore_errors=True)

    def remove(self, key: str) -> None:
        """Remove a snapshot (the caller has unmounted it); a layer dir goes when no snapshot uses it."""
        with self.db.transaction() as conn:
            row = self._row(conn, key)
            if conn.execute(f"SELECT 1 FROM {self._snaps} WHERE parent=?", (key,)).fetchone():
                raise StoreError(f"snapshot {key!r} has children")
            conn.execute(f"DELETE FROM {self._snaps} WHERE key=?", (key,))
            gone = self._drop_dir_if_unused(conn, row["dir_id"])
        if gone is not None:
            shutil.rmtree(self.dir / str(gone), ignore_errors=True)

    def _drop_dir_if_unused(self, conn: sqlite3.Connection, dir_id: int | None) -> int | None:
        if dir_id is None:
            return None
        if conn.execute(f"SELECT 1 FROM {self._snaps} WHERE dir_id=?", (dir_id,)).fetchone():
            return None
        conn.execute(f"DELETE FROM {self._dirs} WHERE id=?", (dir_id,))
        return dir_id

    def stat(self, key: str) -> SnapshotInfo:
        with self.db.reading() as conn:
            return _info(self._row(conn, key))

    def walk(self) -> Iterator[SnapshotInfo]:
        with self.db.reading() as conn:
            rows = conn.execute(f"SELECT * FROM {self._snaps} ORDER BY created").fetchall()
        for r in rows:
            yield _info(r)

    # ---- unpacked layers -----------------------------------------------
    def unpacked_dir(self, diff_id: str) -> Path | None:
        with self.db.reading() as conn:
            row = conn.execute(f"SELECT id FROM {self._dirs} WHERE diff_id=?", (diff_id,)).fetchone()
        return self._fs(row["id"]) if row else None

    def new_staging_dir(self) -> Path:
        """A fresh directory to unpack one layer into (moved into place by `adopt_layer`)."""
        staging = Path(tempfile.mkdtemp(dir=self.dir / "tmp", prefix=f"{os.getpid()}."))
        (staging / "fs").mkdir(mode=0o755)
        os.chmod(staging / "fs", 0o755)     # a layer's "/" when its tar does not say: not our umask's
        return staging

    def adopt_layer(self, staging: Path, diff_id: str, layer_digest: str | None = None,
                    flush: bool | None = None) -> None:
        """Publish an unpacked layer under its diff ID; if another unpack won the race, drop ours.
        With `flush` (default: `sync_fs`), its files reach the disk first: the database, which
        syncs, then never names a directory whose files a power loss emptied."""
        try:
            if self.sync_fs if flush is None else flush:
                libc.syncfs(str(staging))
            with self.db.transaction() as conn:
                if layer_digest:
                    conn.execute(f"INSERT OR REPLACE INTO {self._digests} VALUES (?, ?)", (layer_digest, diff_id))
                if conn.execute(f"SELECT 1 FROM {self._dirs} WHERE diff_id=?", (diff_id,)).fetchone():
                    shutil.rmtree(staging, ignore_errors=True)
                    return
                dir_id = self._new_dir(conn, diff_id)
                os.rename(staging, self.dir / str(dir_id))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def unpack_blob(self, desc: Descriptor) -> str:
        """Unpack a layer from the blob store (when it was not unpacked during the pull)."""
        from lazyoci.snapshot.unpack import apply_layer_stream     # not on `run`'s way to runc

        staging = self.new_staging_dir()
        try:
            with self.blobs.open(desc.digest) as f:
                diff_id = apply_layer_stream(f, desc.media_type, staging / "fs").diff_id
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.adopt_layer(staging, diff_id, desc.digest)
        return diff_id

    def layer_consumer(self, desc: Descriptor) -> "UnpackingConsumer | None":
        """The pull hook: unpack this layer while it downloads (None if it is unpacked already)."""
        from lazyoci.snapshot.unpacking_consumer import UnpackingConsumer

        with self.db.reading() as conn:
            row = conn.execute(f"SELECT 1 FROM {self._digests} l JOIN {self._dirs} d "
                               "ON d.diff_id = l.diff_id WHERE l.digest=?", (desc.digest,)).fetchone()
        return None if row else UnpackingConsumer(self, desc)

    # ---- images ----------------------------------------------------------
    def unpack_image(self, images: object, image: "LocalImage") -> str | None:
        """Make the committed snapshots of the image's layers exist; return the top chain ID.

        Layers are read from the snapshotter's own blob store; `images` (the caller's image
        service) is not used and stays only so that callers keep one call for every snapshotter."""
        diff_ids = image_diff_ids(image)
        parent: str | None = None
        for desc, diff_id, chain in zip(image.manifest.layers, diff_ids, chain_ids(diff_ids)):
            with self.db.reading() as conn:
                have = self._exists(conn, chain)
            if not have:
                self._commit_image_layer(desc, diff_id, chain, parent)
            parent = chain
        return parent

    def _commit_image_layer(self, desc: Descriptor, diff_id: str, chain: str, parent: str | None) -> None:
        """Commit one layer of an image as the snapshot `chain`: unpacked (if not yet) into a dir."""
        if self.unpacked_dir(diff_id) is None:
            got = self.unpack_blob(desc)
            if got != diff_id:
                raise IntegrityError(f"layer {desc.digest} unpacks to diff ID {got}, "
                                     f"the image config says {diff_id}", expected=diff_id, actual=got)
        self._commit_layer(chain, parent, diff_id, {LABEL_LAYER_DIGEST: desc.digest, LABEL_DIFF_ID: diff_id})

    def _commit_layer(self, chain: str, parent: str | None, diff_id: str | None, labels: dict[str, str],
                      extra: dict[str, str] | None = None) -> None:
        """Insert a committed snapshot over the unpacked layer `diff_id` (None: no dir of its own)."""
        with self.db.transaction() as conn:
            if self._exists(conn, chain):
                return  # another process committed it meanwhile
            dir_id = None
            if diff_id is not None:
                row = conn.execute(f"SELECT id FROM {self._dirs} WHERE diff_id=?", (diff_id,)).fetchone()
                if row is None:
                    raise StoreError(f"layer {diff_id} vanished while being committed")
                dir_id = row["id"]
            self._insert_row(conn, chain, KIND_COMMITTED, parent, dir_id, labels, extra)

    def release_unused(self, keep: set[str]) -> list[str]:
        """Remove committed snapshots that no kept key, child or active/view snapshot needs,
        then layer dirs no snapshot uses. `keep`: the top chain IDs of the images that remain.

        A layer dir that was never part of a snapshot belongs to a pull still running
        (unpacked, not yet committed) or to one that crashed: it goes only when old."""
        removed: list[str] = []
        released: set[int] = set()
        dirs: list[int] = []
        with self.db.transaction() as conn:
            while True:
                rows = conn.execute(
                    f"SELECT key, dir_id FROM {self._snaps} s WHERE kind=? AND NOT EXISTS "
                    f"(SELECT 1 FROM {self._snaps} c WHERE c.parent = s.key)", (KIND_COMMITTED,)).fetchall()
                victims = [r for r in rows if r["key"] not in keep]
                if not victims:
                    break
                for r in victims:
                    conn.execute(f"DELETE FROM {self._snaps} WHERE key=?", (r["key"],))
                    removed.append(r["key"])
                    released.add(r["dir_id"])
            old = time.time() - ORPHAN_GRACE_SECONDS
            for r in conn.execute(f"SELECT id, created FROM {self._dirs} d WHERE NOT EXISTS "
                                  f"(SELECT 1 FROM {self._snaps} s WHERE s.dir_id = d.id)").fetchall():
                if r["id"] in released or r["created"] < old:
                    conn.execute(f"DELETE FROM {self._dirs} WHERE id=?", (r["id"],))
                    dirs.append(r["id"])
        for d in dirs:
            shutil.rmtree(self.dir / str(d), ignore_errors=True)
        return removed


def image_diff_ids(image: "LocalImage") -> list[str]:
    """The image's diff IDs, one per layer of its manifest (else the image is inconsistent)."""
    diff_ids = list(image.config.diff_ids)
    if len(diff_ids) != len(image.manifest.layers):
        raise IntegrityError(f"image config lists {len(diff_ids)} diff IDs for "
                             f"{len(image.manifest.layers)} layers")
    return diff_ids


def _info(row: sqlite3.Row) -> SnapshotInfo:
    return SnapshotInfo(row["key"], row["kind"], row["parent"], json.loads(row["labels"]), row["created"])
