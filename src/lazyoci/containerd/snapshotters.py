"""containerd's own snapshot records, over lazyoci's overlayfs and soci snapshotters.

containerd names snapshots itself (`<namespace>/<n>/<key>`) and removes them when its
garbage collector says so, while `lazyoci rmi`/`system prune` release the snapshots of
the CLI's images by chain ID. So containerd's snapshots live in tables and directories
of their own (`ctrd_overlay_*`, `ctrd_soci_*`, <root>/snapshots/containerd-<name>/): the
CLI never releases what containerd holds, and containerd never removes the CLI's. What
they share is the lazy part: the records of which zTOC serves a layer (`lazy_layers`),
the service's views of lazy layers, their span cache and the blob store.

The mechanism (records, overlay mounts, unpacked layers) is the snapshotters' own
(lazyoci.snapshot.layered); this module adds only what containerd's API asks beyond
it: the state checks behind its error codes, label updates, disk usage, and for soci a
committed lazy layer made from a remote snapshot and served by an injected layer server.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lazyoci.config import Config
from lazyoci.errors import SnapshotExistsError, SnapshotNotFoundError, SnapshotStateError
from lazyoci.snapshot.base import KIND_ACTIVE, KIND_COMMITTED, SnapshotInfo
from lazyoci.snapshot.layered import LayeredSnapshotter
from lazyoci.snapshot.overlay import OverlaySnapshotter
from lazyoci.snapshot.soci import LABEL_ZTOC, SociSnapshotter
from lazyoci.store.db import Database
from lazyoci.store.layout import DataRoot

__all__ = ["ContainerdOverlay", "ContainerdSnapshotter", "ContainerdSoci", "Usage", "ViewMounter"]


class ViewMounter(Protocol):
    """What mounts a lazy layer's view inside the service (its LayerManager): containerd's snapshots
    are served in the service's own process, so they call it directly, where the CLI's snapshotter
    goes through the control socket (`snapshot/layer_server.LayerServer`)."""

    def mount(self, ref: str, layer_digest: str, ztoc_digest: str) -> None: ...


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


def _disk_usage(path: Path) -> Usage:
    """Bytes and inodes under `path`, each inode once (hard links), without following links."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames, ""]:
            try:
                st = os.lstat(os.path.join(dirpath, name) if name else dirpath)
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            size += st.st_blocks * 512
    return Usage(size, len(seen))


class _ContainerdCalls(LayeredSnapshotter):
    """The checks and calls of containerd's API over a layered snapshotter's records."""

    def _find(self, conn: sqlite3.Connection, key: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = conn.execute(f"SELECT * FROM {self._snaps} WHERE key=?", (key,)).fetchone()
        return row

    def check_new(self, key: str, parent: str | None) -> None:
        """Before Prepare/View: the key is free, the parent exists and is committed."""
        with self.db.reading() as conn:
            if self._find(conn, key) is not None:
                raise SnapshotExistsError(f"snapshot {key!r} already exists")
            if parent:
                row = self._find(conn, parent)
                if row is None:
                    raise SnapshotNotFoundError(f"parent snapshot {parent!r} does not exist")
                if row["kind"] != KIND_COMMITTED:
                    raise SnapshotStateError(f"parent snapshot {parent!r} is not committed")

    def check_commit(self, name: str, key: str) -> None:
        with self.db.reading() as conn:
            row = self._find(conn, key)
            if row is None:
                raise SnapshotNotFoundError(f"snapshot {key!r} does not exist")
            if row["kind"] != KIND_ACTIVE:
                raise SnapshotStateError(f"snapshot {key!r} is not active and cannot be committed")
            if self._find(conn, name) is not None:
                raise SnapshotExistsError(f"snapshot {name!r} already exists")

    def check_remove(self, key: str) -> None:
        with self.db.reading() as conn:
            if self._find(conn, key) is None:
                raise SnapshotNotFoundError(f"snapshot {key!r} does not exist")
            if conn.execute(f"SELECT 1 FROM {self._snaps} WHERE parent=?", (key,)).fetchone():
                raise SnapshotStateError(f"snapshot {key!r} has children")

    def info(self, key: str) -> SnapshotInfo:
        with self.db.reading() as conn:
            if self._find(conn, key) is None:
                raise SnapshotNotFoundError(f"snapshot {key!r} does not exist")
        return self.stat(key)

    def set_labels(self, key: str, labels: dict[str, str]) -> SnapshotInfo:
        """Replace a snapshot's labels (containerd's Update: the only mutable field)."""
        with self.db.transaction() as conn:
            if self._find(conn, key) is None:
                raise SnapshotNotFoundError(f"snapshot {key!r} does not exist")
            conn.execute(f"UPDATE {self._snaps} SET labels=? WHERE key=?", (json.dumps(labels), key))
        return self.stat(key)

    def committed_target(self, target: str, parent: str | None) -> SnapshotInfo | None:
        """The committed snapshot containerd's unpacker would find for a remote target: labelled
        `containerd.io/snapshot.ref` = target, over the same parent."""
        for info in self.walk():
            if (info.kind == KIND_COMMITTED and info.labels.get("containerd.io/snapshot.ref") == target
                    and (info.parent or "") == (parent or "")):
                return info
        return None

    def usage(self, key: str) -> Usage:
        """The disk space of the snapshot's own directory (a lazy layer has none here)."""
        with self.db.reading() as conn:
            row = self._find(conn, key)
        if row is None:
            raise SnapshotNotFoundError(f"snapshot {key!r} does not exist")
        if row["dir_id"] is None:
            return Usage(0, 0)
        return _disk_usage(self._fs(row["dir_id"]))

    def walk_infos(self) -> Iterator[SnapshotInfo]:
        return self.walk()


class ContainerdOverlay(_ContainerdCalls, OverlaySnapshotter):
    """lazyoci's overlayfs snapshotter as containerd sees it: layers unpacked by containerd."""

    dir_name = "containerd-overlayfs"
    table_prefix = "ctrd_overlay"
    schema_name = "snapshot_containerd_overlayfs"


class ContainerdSoci(_ContainerdCalls, SociSnapshotter):
    """lazyoci's soci snapshotter as containerd sees it: lazy layers committed from remote
    snapshots (lazyoci.containerd.remote finds them), the rest unpacked by containerd."""

    dir_name = "containerd-soci"
    table_prefix = "ctrd_soci"
    schema_name = "snapshot_containerd_soci"

    def __init__(self, root: DataRoot, config: Config, layers: ViewMounter, db: Database | None = None) -> None:
        self.layers = layers
        super().__init__(root, config, db)

    def _serve(self, ref: str, digest: str, ztoc_digest: str) -> None:
        """Serve a view through the injected mounter (the service this runs in)."""
        self.layers.mount(ref, digest, ztoc_digest)

    def commit_lazy(self, name: str, parent: str | None, layer_digest: str, labels: dict[str, str]) -> None:
        """Commit the snapshot `name` of a lazy layer (no directory: its lower is the layer's view)."""
        self._commit_layer(name, parent, None, labels, {"lazy_layer": layer_digest})

    def uses_view(self, layer_digest: str, ztoc_digest: str) -> bool:
        """True while a snapshot of containerd's stands on the layer's view through that zTOC."""
        with self.db.reading() as conn:
            rows = conn.execute(f"SELECT labels FROM {self._snaps} WHERE lazy_layer=?", (layer_digest,)).fetchall()
        return any(json.loads(r["labels"] or "{}").get(LABEL_ZTOC) == ztoc_digest for r in rows)

    def is_lazy_layer(self, key: str) -> bool:
        with self.db.reading() as conn:
            row = self._find(conn, key)
        return bool(row is not None and row["lazy_layer"])


ContainerdSnapshotter = ContainerdOverlay | ContainerdSoci
