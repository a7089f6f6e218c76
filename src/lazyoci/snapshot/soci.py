"""The `soci` snapshotter: layers with a zTOC are served lazily by the lazyoci service.

A committed snapshot of a lazy layer has no directory of its own: its lower is
the layer's view through the snapshot's zTOC (label com.amazon.soci.ztoc-digest)
in the service's FUSE mount (<root>/service/mnt/<layer hex>-<16 hex of the zTOC>, or
mnt-plain/ for a layer with no xattrs: the server's `lower_dir`), mounted on demand (`mounts()` starts the service and asks it to mount the layer
if it is not there, e.g. after a reboot). Once the service has every span of a
layer, it unpacks the layer from its span cache (snapshot/cached_unpack.py: the tar
must hash to the diff ID the image config gives) and the snapshot gets that
directory: containers started from then on stack it as overlayfs does, with no
FUSE request per file. Layers without a zTOC fall back to the shared unpack path
of lazyoci.snapshot.layered (safe unpack, streaming consumer) into this
snapshotter's own directories, so the two snapshotters never free each other's
data. Everything else (records, mounts, release) is that shared mechanism.

Keys: a lazy view is only as true as its zTOC, so a committed snapshot with a lazy
layer at or below it is keyed by its chain ID plus the zTOCs of those lazy layers
(`snapshot_keys`): an image whose index gives a layer another zTOC (a hostile index
of a popular base layer, say) gets snapshots of its own and never changes what
another image sees. A snapshot of unpacked layers only is verified content: it keeps
its chain ID and is shared by every image. Which zTOC serves a layer of an image is
what the image's lazy pull recorded (store/lazy_layer_records.py).

Layout: <root>/snapshots/soci/ (as in layered.py). Database: `lazy_dirs`,
`lazy_snapshots` (plus `lazy_layer`: the digest of a committed lazy layer),
`lazy_layer_digests`, and the records of the lazy pulls (store/lazy_layer_records.py:
`lazy_layers`, `lazy_image_layers`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

from lazyoci.config import Config
from lazyoci.errors import ConfigError, StoreError
from lazyoci.oci.manifest import chain_ids
from lazyoci.snapshot.base import KIND_COMMITTED, LABEL_DIFF_ID, LABEL_LAYER_DIGEST
from lazyoci.snapshot.layered import LayeredSnapshotter, image_diff_ids
from lazyoci.store.lazy_layer_records import LazyLayerRecord, LazyLayerRecords
from lazyoci.store.blobs import BlobStore
from lazyoci.store.db import Database
from lazyoci.store.layout import DataRoot

if TYPE_CHECKING:
    from lazyoci.images.progress import ProgressSink
    from lazyoci.images.service import ImageService, LocalImage
    from lazyoci.oci.platform import Platform
    from lazyoci.registry.client import RegistryClient
    from lazyoci.snapshot.layer_server import LayerServer

__all__ = ["LABEL_ZTOC", "LazyLayerRecord", "SociSnapshotter", "StargzSnapshotter", "snapshot_keys"]

LABEL_ZTOC = "com.amazon.soci.ztoc-digest"   # the digest of the view's index, a zTOC or a layer's own
_VIEWS_MARK = "+ztocs:"     # a key past it names the zTOCs of the lazy layers below


def snapshot_keys(diff_ids: list[str], ztocs: list[str | None]) -> list[str]:
    """The keys of an image's committed layer snapshots, bottom first (`ztocs`: each layer's
    zTOC, None when unpacked): the chain ID up to the first lazy layer; from there on the
    chain ID plus a digest of (position, zTOC) of every lazy layer at or below."""
    views = hashlib.sha256()
    lazy = False
    keys = []
    for i, (chain, ztoc) in enumerate(zip(chain_ids(diff_ids), ztocs)):
        if ztoc is not None:
            lazy = True
            views.update(f"{i} {ztoc}\n".encode())
        keys.append(f"{chain}{_VIEWS_MARK}{views.hexdigest()}" if lazy else chain)
    return keys


def _ztoc_of(row: sqlite3.Row) -> str:
    """The zTOC a committed lazy snapshot was made with (its view in the FUSE mount)."""
    ztoc = json.loads(row["labels"] or "{}").get(LABEL_ZTOC)
    if not ztoc:
        raise StoreError(f"lazy snapshot {row['key']} has no zTOC label; pull the image again")
    return ztoc


class SociSnapshotter(LayeredSnapshotter):
    name = "soci"
    dir_name = "soci"
    table_prefix = "lazy"
    schema_name = "snapshot_soci"
    extra_snapshot_columns = "lazy_layer TEXT,   -- committed lazy layer: its digest (lower = FUSE dir until unpacked)"

    def __init__(self, root: DataRoot, config: Config, db: Database | None = None, *,
                 server: "LayerServer | None" = None, records: LazyLayerRecords | None = None,
                 client: "RegistryClient | None" = None, blobs: BlobStore | None = None) -> None:
        """Each collaborator may be given (a front end of its own, a test): `server` serves the
        lazy layers (default: the lazyoci service), `records` are the lazy pulls' records,
        `client` the registry client of lazy pulls (needed only to pull)."""
        self.config = config
        if server is None:
            from lazyoci.service.client import ServiceClient

            server = ServiceClient(root, config.path)
        self.service: LayerServer = server
        self.client = client
        super().__init__(root, db, blobs, sync_fs=config.unpack_sync_fs)
        self.records = records or LazyLayerRecords(self.db)

    # ---- where a lazy layer's lower comes from ---------------------------------
    def _lower(self, row: sqlite3.Row) -> str:
        """A lazy layer's view in the FUSE mount, until the layer has been unpacked from the span
        cache (`attach_unpacked`): then its directory, as for any unpacked layer."""
        if row["lazy_layer"] and row["dir_id"] is None:
            return os.fspath(self.service.lower_dir(row["lazy_layer"], _ztoc_of(row)))
        return super()._lower(row)

    def _make_available(self, chain: list[sqlite3.Row]) -> None:
        self._ensure_served([(r["lazy_layer"], _ztoc_of(r)) for r in chain
                             if r["lazy_layer"] and r["dir_id"] is None])

    def _ensure_served(self, views: list[tuple[str, str]]) -> None:
        """Mount the (layer, zTOC) views that the service does not show (yet)."""
        for digest, ztoc_digest in views:
            if os.path.isdir(self.service.view_dir(digest, ztoc_digest)):
                continue
            rec = self.lazy_layer(digest, ztoc_digest)
            if rec is None:
                raise StoreError(f"lazy layer {digest} has no record of zTOC {ztoc_digest}; pull the image again")
            self._serve(rec.ref, digest, ztoc_digest)

    def _serve(self, ref: str, digest: str, ztoc_digest: str) -> None:
        """Have one view served: start the service if it is not running, and ask it to mount."""
        self.service.ensure_running()
        self.service.mount_layer(ref, digest, ztoc_digest)

    # ---- lazy layers -----------------------------------------------------------
    def record_lazy_layer(self, rec: LazyLayerRecord) -> None:
        self.records.record_layer(rec)

    def lazy_layer(self, layer_digest: str, ztoc_digest: str | None = None) -> LazyLayerRecord | None:
        """The record of the layer's view through `ztoc_digest` (None: the latest recorded)."""
        return self.records.layer(layer_digest, ztoc_digest)

    def forget_lazy_layer(self, layer_digest: str, ztoc_digest: str) -> None:
        """The layer is no longer lazy through this zTOC (it was refused): it is committed from its blob."""
        self.records.forget_layer(layer_digest, ztoc_digest)

    def record_image_ztocs(self, image: "LocalImage", ztocs: dict[str, str]) -> None:
        """What this lazy pull gave the image's layers (layer digest -> zTOC; empty: nothing lazy)."""
        self.records.record_image(image.name or "", image.manifest.digest, ztocs)

    @classmethod
    def waiting_diff_ids(cls, db: Database, layer_digest: str) -> tuple[set[str], bool]:
        """The diff IDs that the committed lazy snapshots of the layer without a directory of
        their own say it has (one, unless an image config lies; empty when none waits), and
        whether one of the layer's lazy snapshots has an unpacked directory already."""
        with db.reading() as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                                (f"{cls.table_prefix}_snapshots",)).fetchone():
                return set(), False      # this snapshotter never ran in the data root
            rows = conn.execute(f"SELECT labels, dir_id FROM {cls.table_prefix}_snapshots "
                                "WHERE lazy_layer=?", (layer_digest,)).fetchall()
        waiting = {d for r in rows if r["dir_id"] is None
                   and (d := json.loads(r["labels"] or "{}").get(LABEL_DIFF_ID))}
        return waiting, any(r["dir_id"] is not None for r in rows)

    def attach_unpacked(self, layer_digest: str, diff_id: str) -> int:
        """Make the unpacked layer `diff_id` the lower of the lazy snapshots of `layer_digest`
        that say it has that diff ID; returns how many. Mounts made from then on stack the
        directory; those made before keep the FUSE view, which stays served while a snapshot
        stands on it. The directory goes with the last snapshot that uses it."""
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT id FROM {self._dirs} WHERE diff_id=?", (diff_id,)).fetchone()
            if row is None:
                raise StoreError(f"layer {diff_id} is not unpacked")
            keys = [r["key"] for r in conn.execute(
                f"SELECT key, labels FROM {self._snaps} WHERE lazy_layer=? AND dir_id IS NULL",
                (layer_digest,)).fetchall() if json.loads(r["labels"] or "{}").get(LABEL_DIFF_ID) == diff_id]
            for key in keys:
                conn.execute(f"UPDATE {self._snaps} SET dir_id=? WHERE key=?", (row["id"], key))
        return len(keys)

    def is_lazy(self, key: str) -> bool:
        """True if any layer below `key` is served lazily (what `ps` may call "soci")."""
        with self.db.reading() as conn:
            row = self._row(conn, key)
            chain = self._chain(conn, row["parent"]) + ([row] if row["kind"] == KIND_COMMITTED else [])
        return any(r["lazy_layer"] for r in chain)

    def unpack_image(self, images: object, image: "LocalImage") -> str | None:
        """Make the committed snapshots of the image's layers exist, lazy through the zTOCs the
        image's lazy pull recorded; return the top key (see `snapshot_keys`). As for overlayfs,
        `images` is not used (blobs come from the snapshotter's own store)."""
        diff_ids = image_diff_ids(image)
        ztocs = self._layer_ztocs(image, diff_ids)
        parent: str | None = None
        for desc, diff_id, ztoc, key in zip(image.manifest.layers, diff_ids, ztocs, snapshot_keys(diff_ids, ztocs)):
            with self.db.reading() as conn:
                have = self._exists(conn, key)
            if not have:
                if ztoc is not None:
                    labels = {LABEL_LAYER_DIGEST: desc.digest, LABEL_DIFF_ID: diff_id, LABEL_ZTOC: ztoc}
                    unpacked = diff_id if self.unpacked_dir(diff_id) is not None else None   # from the cache
                    self._commit_layer(key, parent, unpacked, labels, {"lazy_layer": desc.digest})
                else:
                    if self.unpacked_dir(diff_id) is None and not self.blobs.has(desc.digest):
                        raise StoreError(f"layer {desc.digest} was neither downloaded nor indexed; "
                                         "pull the image again")
                    self._commit_image_layer(desc, diff_id, key, parent)
            parent = key
        return parent

    def _layer_ztocs(self, image: "LocalImage", diff_ids: list[str]) -> list[str | None]:
        """The zTOC serving each layer of the image (None: unpacked), as its lazy pull recorded.

        An image whose name was never pulled lazily (a `tag` of one that was) borrows the
        zTOCs of its manifest's latest lazy pull, only for the layers it does not hold."""
        recorded, own = self.records.image_ztocs(image.name, image.manifest.digest)
        out: list[str | None] = []
        for desc, diff_id in zip(image.manifest.layers, diff_ids):
            ztoc = recorded.get(desc.digest)
            if ztoc is not None and not own and (self.blobs.has(desc.digest) or self.unpacked_dir(diff_id)):
                ztoc = None                      # verified content at hand: no one else's index
            if ztoc is not None and not (self.blobs.has(ztoc) and self.lazy_layer(desc.digest, ztoc)):
                ztoc = None
            out.append(ztoc)
        return out

    def release_unused(self, keep: set[str]) -> list[str]:
        """Release as the shared mechanism does; then unmount the (layer, zTOC) views of lazy
        layers that no snapshot uses (also a layer's view through another index than the one
        its snapshots use).

        `keep` holds chain IDs (of the images that remain) or keys. A snapshot with lazy
        layers below is kept for a chain ID only while a remaining image's records still use
        every view it stacks: the snapshots of an index whose images are gone go.

        The indexes layers carry themselves (eStargz, zstd:chunked TOCs) are held by their
        layer; once no remaining image's records use a view of that layer, they are let go
        (the next blob garbage collection deletes them)."""
        removed = super().release_unused(self._keys_to_keep(keep))
        self._release_own_indexes()
        with self.db.reading() as conn:
            used = {(r["lazy_layer"], json.loads(r["labels"] or "{}").get(LABEL_ZTOC)) for r in conn.execute(
                "SELECT lazy_layer, labels FROM lazy_snapshots WHERE lazy_layer IS NOT NULL").fetchall()}
        ours = self.records.layer_digests()
        self.service.release_views([v for v in self.service.recorded_views() if v[0] in ours and v not in used])
        return removed

    def _release_own_indexes(self) -> None:
        """Drop the layer owners (`layer-index:`, `zstd-chunked:`) of layers no remaining
        image's lazy records use; the blobs then go at the next garbage collection."""
        from lazyoci.snapshot.own_index import OWNER_KINDS
        from lazyoci.store.image_records import ImageRecords

        image_records = ImageRecords(self.db, self.blobs)
        needed = {layer for layer, _index in self.records.live_views(*image_records.named_manifests())}
        for kind in OWNER_KINDS:
            for owner in image_records.owners_of_kind(kind):
                if owner.split(":", 1)[1] not in needed:
                    image_records.drop_owner(owner)

    def _keys_to_keep(self, keep: set[str]) -> set[str]:
        """`keep` (chain IDs or keys) as the keys of committed snapshots (see release_unused)."""
        from lazyoci.store.image_records import ImageRecords

        live = self.records.live_views(*ImageRecords(self.db, self.blobs).named_manifests())
        with self.db.reading() as conn:
            rows = {r["key"]: r for r in conn.execute(
                "SELECT key, parent, lazy_layer, labels FROM lazy_snapshots WHERE kind=?", (KIND_COMMITTED,)).fetchall()}
        out: set[str] = set()
        for key, row in rows.items():
            views: set[tuple[str, str]] = set()
            r: sqlite3.Row | None = row
            while r is not None:
                if r["lazy_layer"]:
                    views.add((r["lazy_layer"], json.loads(r["labels"] or "{}").get(LABEL_ZTOC)))
                r = rows.get(r["parent"]) if r["parent"] else None
            chain, mark, _ = key.partition(_VIEWS_MARK)
            if not views and key in keep:
                out.add(key)               # unpacked layers only: verified, any image's
            elif mark and (key in keep or (chain in keep and views <= live)):
                out.add(key)               # (a lazy snapshot keyed by chain ID alone, of an older
                                           # lazyoci, goes once nothing is mounted on it)
        return out

    # ---- the lazy pull -------------------------------------------------------------
    def _pull_client(self) -> "RegistryClient":
        """The registry client given at construction: a lazy pull resolves, discovers and fetches
        through it (one client, so the tag is resolved once and credentials are asked once)."""
        if self.client is None:
            raise ConfigError(f"the {self.name} snapshotter was made without a registry client: "
                              "give one to pull lazily")
        return self.client

    def pull(self, images: "ImageService", ref: str, platform: "Platform | None" = None,
             progress: "ProgressSink | None" = None, index_digest: str | None = None,
             log: Callable[[str], None] | None = None) -> "LocalImage":
        """`pull --snapshotter soci` (see lazyoci.snapshot.soci_pull): `images` fetches and records
        the image; `log` receives the INFO lines of a fallback (None: they are dropped)."""
        from lazyoci.snapshot.soci_pull import LazyPull

        client = self._pull_client()
        return LazyPull(self, self.records, self.service, client, images, log).run(ref, platform, progress,
                                                                                  index_digest)


class StargzSnapshotter(SociSnapshotter):
    """`--snapshotter stargz` (nerdctl's name): lazy through the indexes layers carry themselves
    (eStargz), without looking for a SOCI index. It is the soci snapshotter's data and service
    under another name, so images and containers of either are the same snapshots."""

    name = "stargz"

    def pull(self, images: "ImageService", ref: str, platform=None, progress=None,
             index_digest: str | None = None, log=None) -> "LocalImage":
        from lazyoci.snapshot.soci_pull import LazyPull

        if index_digest is not None:
            raise ConfigError("--soci-index-digest is for --snapshotter soci, not stargz")
        client = self._pull_client()
        return LazyPull(self, self.records, self.service, client, images, log).run(ref, platform, progress,
                                                                                  None, own_only=True)
