"""`soci rebuild-db`: lazyoci's SOCI records made again from the blobs in the store.

The reference's `soci rebuild-db` does this for its artifact database, after an index was
removed or content arrived some other way. Here: records whose blob is gone are dropped, and
each SOCI index blob that serves a local image manifest (a v1 index through its subject, a
v2 index through the manifest's `com.amazon.soci.index-digest` annotation) is recorded again
and holds its blobs against gc, with a zTOC record for each of its zTOCs that is present and
parses (so `soci create` reuses it). Every blob is read through the store, so verified.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazyoci.errors import LazyociError
from lazyoci.oci.manifest import Manifest
from lazyoci.soci.index import (ANN_INDEX_DIGEST, ANN_LAYER_DIGEST, ANN_LAYER_MEDIA_TYPE, ANN_SPAN_SIZE,
                                EMPTY_CONFIG_DIGEST, SociIndex)
from lazyoci.soci.index_records import SociRecords, ZtocRecord

if TYPE_CHECKING:
    from lazyoci.store.blobs import BlobStore
    from lazyoci.store.image_records import ImageRecords

_MAX_INDEX_BYTES = 4 << 20     # an index is a small manifest: larger blobs (layers) are not read


@dataclass(frozen=True)
class RebuildResult:
    removed: int             # records whose blob was gone
    indexes_added: int
    ztocs_added: int


def _local_manifests(blobs: "BlobStore", image_records: "ImageRecords"
                     ) -> tuple[dict[str, tuple[str, str | None, str]], dict[str, str]]:
    """manifest digest -> (image digest, image name, platform) of every local image, and
    index digest -> manifest digest for the manifests that name their v2 index."""
    manifests: dict[str, tuple[str, str | None, str]] = {}
    v2: dict[str, str] = {}
    for content in image_records.contents():
        names = image_records.names_of(content.digest)
        for manifest, platform, _ in content.platforms:
            manifests[manifest] = (content.digest, names[0] if names else None, platform)
            try:
                annotations = Manifest.parse(blobs.read(manifest)).annotations
            except LazyociError:
                continue
            if annotations.get(ANN_INDEX_DIGEST):
                v2[annotations[ANN_INDEX_DIGEST]] = manifest
    return manifests, v2


def _record_ztocs(blobs: "BlobStore", records: SociRecords, index: SociIndex) -> int:
    from lazyoci.ztoc import Ztoc

    added = 0
    for d in index.ztocs:
        span = d.annotations.get(ANN_SPAN_SIZE)
        layer = d.annotations[ANN_LAYER_DIGEST]
        if span is None or not blobs.has(d.digest) or records.find_ztoc(layer, int(span)):
            continue
        try:
            ztoc = Ztoc.parse(blobs.read(d.digest))
        except LazyociError:
            continue
        records.put_ztoc(ZtocRecord(layer, int(span), d.digest, d.size,
                                    d.annotations.get(ANN_LAYER_MEDIA_TYPE, ""), ztoc.compressed_size, time.time()))
        added += 1
    return added


def rebuild_records(blobs: "BlobStore", records: SociRecords, image_records: "ImageRecords") -> RebuildResult:
    """Drop the SOCI records of missing blobs, then record the index blobs of local images."""
    removed = records.prune(blobs.has)
    manifests, v2 = _local_manifests(blobs, image_records)
    known = {(r.index_digest, r.manifest_digest) for r in records.indexes()}
    indexes = ztocs = 0
    for digest in sorted(blobs.digests()):
        size = blobs.size(digest)
        if size is None or not 10 <= size <= _MAX_INDEX_BYTES:
            continue
        try:
            index = SociIndex.parse(blobs.read(digest))
        except LazyociError:
            continue                 # not an index (a manifest, a config, ...)
        manifest = index.subject.digest if index.subject is not None else v2.get(digest)
        if manifest is None or manifest not in manifests:
            continue                 # an index of no local image: nothing to tie it to
        if (digest, manifest) not in known:
            image_digest, name, platform = manifests[manifest]
            records.put_index(digest, manifest, image_digest, name, platform, index.version, index.size,
                              "built" if index.build_tool.startswith("lazyoci") else "fetched")
            records.own(digest, {EMPTY_CONFIG_DIGEST, *(d.digest for d in index.ztocs + index.prefetch)})
            indexes += 1
        ztocs += _record_ztocs(blobs, records, index)
    return RebuildResult(removed, indexes, ztocs)
