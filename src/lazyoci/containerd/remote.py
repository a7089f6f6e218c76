"""Remote snapshots: whether a layer containerd is about to unpack can be served lazily.

containerd's unpacker asks Prepare for each layer with labels that name the image
(`containerd.io/snapshot/cri.image-ref`, `cri.manifest-digest`, `cri.layer-digest`,
`cri.image-layers`; set by CRI, `lazyoci containerd pull` and the reference's rpull).
From them this module finds the image's SOCI index the way `pull --snapshotter soci`
does (lazyoci.soci.discover_index), stores the layer's zTOC as a verified blob and
records it (`lazy_layers`), so that the layer server can mount the layer. Anything
that stands in the way (no labels, no index, no zTOC for the layer, a registry that
does not answer, a zTOC that does not parse) is a reason, not an error: containerd
then downloads and unpacks the layer itself.

The image manifest is fetched by the digest of its label and checked against it, so a
layer is lazy only if that manifest lists it; the index and zTOC are checked against
their descriptors. Discovered indexes are kept per repository and manifest for a while, so the layers
of one image cost one discovery.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazyoci.errors import FormatError, LazyociError
from lazyoci.oci.digest import Digest
from lazyoci.oci.manifest import Manifest
from lazyoci.oci.reference import Reference
from lazyoci.store import lazy_layer_records as lazy_records
from lazyoci.store.lazy_layer_records import LazyLayerRecord
from lazyoci.store.blobs import BlobStore
from lazyoci.store.db import Database
from lazyoci.store.image_records import ImageRecords

if TYPE_CHECKING:
    from lazyoci.registry import RegistryClient
    from lazyoci.soci.discovery import DiscoveredIndex

__all__ = ["LABEL_IMAGE_LAYERS", "LABEL_IMAGE_REF", "LABEL_LAYER_DIGEST", "LABEL_MANIFEST_DIGEST",
           "LABEL_TARGET", "LazyLayer", "RemoteLayers", "blob_owner"]

LABEL_TARGET = "containerd.io/snapshot.ref"
LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"

_CACHE_ENTRIES = 32
_CACHE_SECONDS = 300.0


def blob_owner(snapshot_name: str) -> str:
    """The owner of the index and zTOC blobs a containerd snapshot stands on (store.records' blob_refs)."""
    return f"containerd-snapshot:{snapshot_name}"


@dataclass(frozen=True)
class LazyLayer:
    """A layer that can be served lazily: its record (zTOC, where to fetch spans, index)."""

    record: LazyLayerRecord


class RemoteLayers:
    """Finds, for containerd's image labels, the zTOC that serves a layer lazily."""

    def __init__(self, client: "RegistryClient", blobs: BlobStore, db: Database) -> None:
        self.client = client
        self.blobs = blobs
        self.db = db
        self.image_records = ImageRecords(db, blobs)      # the owner of blob ownership and leases
        self._found: OrderedDict[tuple[str, str], tuple[float, "DiscoveredIndex | None", Manifest]] = OrderedDict()
        self._lock = threading.Lock()

    def find(self, labels: dict[str, str], owner: str) -> LazyLayer | str:
        """The layer's lazy record, its zTOC stored and owned by `owner`; or why not (a reason)."""
        image_ref = labels.get(LABEL_IMAGE_REF)
        manifest_digest = labels.get(LABEL_MANIFEST_DIGEST)
        layer_digest = labels.get(LABEL_LAYER_DIGEST)
        if not (image_ref and manifest_digest and layer_digest):
            return "no image labels (cri.image-ref, cri.manifest-digest, cri.layer-digest)"
        try:
            Digest.parse(manifest_digest)
            Digest.parse(layer_digest)
            reference = Reference.parse(image_ref)
            found, manifest = self._discover(reference, manifest_digest)
            if layer_digest not in {l.digest for l in manifest.layers}:
                return f"image {image_ref} ({manifest_digest}) has no layer {layer_digest}"
            if found is None:
                return f"image {image_ref} has no SOCI index"
            zdesc = found.ztocs.get(layer_digest)
            if zdesc is None:
                return f"the SOCI index {found.digest} has no zTOC for layer {layer_digest}"
            self._store(reference, found, zdesc.digest, zdesc.size, owner)
        except LazyociError as e:
            return f"{type(e).__name__}: {e}"
        rec = LazyLayerRecord(layer_digest, zdesc.digest, f"{reference.name}@{manifest_digest}", found.digest)
        lazy_records.record_layer(self.db, rec)
        return LazyLayer(rec)

    def _discover(self, reference: Reference, manifest_digest: str) -> tuple["DiscoveredIndex | None", Manifest]:
        from lazyoci.soci.discovery import discover_index

        now = time.monotonic()
        key = (f"{reference.registry}/{reference.repository}", manifest_digest)  # an index is per repository
        with self._lock:
            hit = self._found.get(key)
            if hit is not None and now - hit[0] < _CACHE_SECONDS:
                return hit[1], hit[2]
        raw, media_type, got = self.client.get_manifest(reference.with_digest(manifest_digest))
        if got != manifest_digest:
            raise FormatError(f"manifest {manifest_digest}: the registry sent {got}")
        manifest = Manifest.parse(raw, media_type)
        found = discover_index(self.client, reference, manifest, manifest_digest)
        with self._lock:
            self._found[key] = (now, found, manifest)
            while len(self._found) > _CACHE_ENTRIES:
                self._found.popitem(last=False)
        return found, manifest

    def _store(self, reference: Reference, found: "DiscoveredIndex", ztoc_digest: str, size: int,
               owner: str) -> None:
        """Store the index and the zTOC (verified; the zTOC parsed) and give them to `owner`."""
        from lazyoci.ztoc import Ztoc

        with self.image_records.lease() as lease:
            lease.add([found.digest, ztoc_digest])
            if not self.blobs.has(found.digest):
                self.blobs.put_bytes(found.manifest.raw, found.digest)
            if not self.blobs.has(ztoc_digest):
                with self.blobs.writer(ztoc_digest, size) as w:
                    for chunk in self.client.iter_blob(reference, ztoc_digest, size):
                        w.write(chunk)
                    w.commit()
            try:
                Ztoc.parse(self.blobs.read(ztoc_digest), digest=ztoc_digest)
            except FormatError as e:
                raise FormatError(f"zTOC {ztoc_digest}: {e}") from None
            self.image_records.add_owner(owner, [found.digest, ztoc_digest])
