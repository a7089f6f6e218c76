"""containerd's snapshotter calls over one lazyoci snapshotter, with remote snapshots for soci.

This is the part of the Snapshots service that knows nothing of gRPC: each call checks
the state containerd's API promises (raising SnapshotNotFoundError, SnapshotExistsError
or SnapshotStateError, which the gRPC edge turns into NotFound, AlreadyExists and
FailedPrecondition) and then uses the snapshotter's own calls.

A Prepare on the soci snapshotter with a target (`containerd.io/snapshot.ref`) is a
chance for a remote snapshot: if the layer can be served lazily, the layer server mounts
it, the snapshot is committed here under the Prepare's key with the target label (that
is how containerd finds it) and the answer is AlreadyExists, so containerd skips the
download. Otherwise the Prepare goes on as usual and containerd unpacks the layer; the
label `lazyoci.remote` says which it was ("lazy", or "downloaded: <why>"), and the
service log says it in one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from lazyoci.containerd.filters import SnapshotFilter
from lazyoci.containerd.remote import LABEL_LAYER_DIGEST as LABEL_CRI_LAYER
from lazyoci.containerd.remote import LABEL_IMAGE_REF, LABEL_TARGET, RemoteLayers, blob_owner
from lazyoci.containerd.snapshotters import ContainerdOverlay, ContainerdSoci, Usage
from lazyoci.errors import ConfigError, LazyociError, SnapshotExistsError
from lazyoci.snapshot.base import LABEL_LAYER_DIGEST, Mount, SnapshotInfo
from lazyoci.snapshot.soci import LABEL_ZTOC

__all__ = ["LABEL_REMOTE", "SnapshotBackend"]

LABEL_REMOTE = "lazyoci.remote"
_REASON_MAX = 400          # containerd caps a label at 4096 bytes (key and value)

log = logging.getLogger(__name__)


class SnapshotBackend:
    """One snapshotter as containerd sees it (by the name in its proxy_plugins)."""

    def __init__(self, snap: ContainerdOverlay | ContainerdSoci, remote: RemoteLayers | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.snap = snap
        self.remote = remote if isinstance(snap, ContainerdSoci) else None
        self.say = say or log.info

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        parent_key = parent or None
        target = labels.get(LABEL_TARGET)
        if target and isinstance(self.snap, ContainerdSoci):
            existing = self.snap.committed_target(target, parent_key)
            if existing is not None:
                raise SnapshotExistsError(f"target snapshot {target!r} exists as {existing.key!r}")
            self.snap.check_new(key, parent_key)
            why = self._remote(key, parent_key, target, labels)
            if why is None:
                raise SnapshotExistsError(f"target snapshot {target!r} is served lazily")
            labels = {**labels, LABEL_REMOTE: f"downloaded: {why}"[:_REASON_MAX]}
        self.snap.check_new(key, parent_key)
        return self.snap.prepare(key, parent_key, labels)

    def _remote(self, key: str, parent: str | None, target: str, labels: dict[str, str]) -> str | None:
        """Commit `key` as a lazy layer; None when done, else why containerd downloads the layer."""
        assert isinstance(self.snap, ContainerdSoci)
        layer = labels.get(LABEL_CRI_LAYER, "?")
        image = labels.get(LABEL_IMAGE_REF, "?")
        if self.remote is None:
            why = "remote snapshots are off"
        else:
            owner = blob_owner(key)
            found = self.remote.find(labels, owner)
            if isinstance(found, str):
                why = found
            else:
                rec = found.record
                try:
                    self.snap.layers.mount(rec.ref, rec.layer_digest, rec.ztoc_digest)
                    self.snap.commit_lazy(key, parent, rec.layer_digest, {
                        **labels, LABEL_ZTOC: rec.ztoc_digest, LABEL_LAYER_DIGEST: rec.layer_digest,
                        LABEL_REMOTE: "lazy"})
                except LazyociError as e:
                    self._release_blobs(key)
                    why = f"the zTOC {rec.ztoc_digest} cannot be served ({type(e).__name__}: {e})"
                else:
                    self.say(f"layer {layer} of {image}: lazy through zTOC {rec.ztoc_digest} "
                             f"(snapshot {target})")
                    return None
        self.say(f"layer {layer} of {image}: left to containerd to download ({why})")
        return why

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        self.snap.check_new(key, parent or None)
        return self.snap.view(key, parent or None, labels)

    def mounts(self, key: str) -> list[Mount]:
        self.snap.info(key)
        return self.snap.mounts(key)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        self.snap.check_commit(name, key)
        self.snap.commit(name, key, labels)

    def remove(self, key: str) -> None:
        self.snap.check_remove(key)
        self.snap.remove(key)
        self._release_blobs(key)

    def _release_blobs(self, key: str) -> None:
        """The index and zTOC blobs of a lazy snapshot go with it (when nothing else owns them,
        at the next `system prune`)."""
        from lazyoci.store.image_records import ImageRecords

        ImageRecords(self.snap.db, self.snap.blobs).drop_owner(blob_owner(key))

    def stat(self, key: str) -> SnapshotInfo:
        return self.snap.info(key)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> SnapshotInfo:
        """containerd's Update: labels only (name, parent, kind and times are immutable).
        `paths` empty or "labels": replace them all; "labels.K": set (or drop) K alone."""
        current = dict(self.snap.info(key).labels)
        if not paths or "labels" in paths:
            current = dict(labels)
        else:
            for p in paths:
                if not p.startswith("labels."):
                    raise ConfigError(f"cannot update field {p!r} of a snapshot (only labels)")
                k = p[len("labels."):]
                if k in labels:
                    current[k] = labels[k]
                else:
                    current.pop(k, None)
        return self.snap.set_labels(key, current)

    def usage(self, key: str) -> Usage:
        return self.snap.usage(key)

    def walk(self, filters: list[str]) -> Iterator[SnapshotInfo]:
        parsed = [SnapshotFilter.parse(f) for f in filters]
        for info in self.snap.walk():
            if not parsed or any(f.matches(info) for f in parsed):
                yield info
