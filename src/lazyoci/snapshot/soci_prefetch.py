"""The lazy pull's part of recorded prefetch: take a lazy layer's prefetch artifact from its index.

The SOCI index that gives a layer its zTOC may also give it a prefetch artifact (soci/prefetch.py).
The pull downloads it like a zTOC (digest verified, stored as a blob the index owns), checks that
it parses, and records it for the layer's view, so that the service prefetches its spans at mount
(service/prefetch_records.py, fs/span_prefetch.py). An artifact that cannot be used is named in one
INFO line and the layer stays lazy without it: prefetch only speeds a start up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from lazyoci.errors import FormatError, LazyociError

if TYPE_CHECKING:
    from lazyoci.soci.index import SociIndex
    from lazyoci.store.blobs import BlobStore
    from lazyoci.store.db import Database

StoreBlob = Callable[[str, int], None]      # download, verify and store a blob (digest, size)


def take_prefetch_artifact(index: "SociIndex", layer_digest: str, ztoc_digest: str, blobs: "BlobStore",
                           db: "Database", store: StoreBlob, say: Callable[[str], None]) -> str | None:
    """Record the index's prefetch artifact for the view (layer, zTOC); returns its digest, or
    None when the index has none for the layer or it cannot be used (then `say` tells why)."""
    from lazyoci.service.prefetch_records import record_prefetch
    from lazyoci.soci.index import ANN_LAYER_DIGEST
    from lazyoci.soci.prefetch import MAX_ARTIFACT_BYTES, PrefetchArtifact

    desc = next((d for d in index.prefetch if d.annotations.get(ANN_LAYER_DIGEST) == layer_digest), None)
    if desc is None:
        record_prefetch(db, layer_digest, ztoc_digest, None)
        return None
    what = f"prefetch artifact {desc.digest} of layer {layer_digest}"
    try:
        if desc.size > MAX_ARTIFACT_BYTES:
            raise FormatError(f"it is {desc.size} bytes, over lazyoci's limit of {MAX_ARTIFACT_BYTES}")
        store(desc.digest, desc.size)
        PrefetchArtifact.parse(blobs.read(desc.digest), what)     # read() verifies the digest again
    except LazyociError as e:
        say(f"INFO: {what} is not used ({e}): the layer loads lazily without prefetch")
        record_prefetch(db, layer_digest, ztoc_digest, None)
        return None
    record_prefetch(db, layer_digest, ztoc_digest, desc.digest)
    return desc.digest
