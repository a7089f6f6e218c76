"""Pushing a local image's v1 SOCI index: which index goes, and building one first when asked.

What `lazyoci soci push` and `lazyoci push --snapshotter soci` (also `build --soci`) do
besides printing: the CLI only formats the lines this module reports through `log`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lazyoci.errors import StoreError
from lazyoci.oci.reference import Reference

if TYPE_CHECKING:
    from lazyoci.images.service import LocalImage
    from lazyoci.oci.platform import Platform
    from lazyoci.soci.build import SociBuildOptions
    from lazyoci.soci.index import SociIndex
    from lazyoci.soci.push import PushResult
    from lazyoci.soci.index_records import SociRecords
    from lazyoci.registry.client import RegistryClient
    from lazyoci.soci.local_images import LocalImages
    from lazyoci.store.blobs import BlobStore
    from lazyoci.store.image_records import Lease

__all__ = ["build_and_push_index", "newest_v1_index", "push_local_index"]

Log = Callable[[str], None]


def newest_v1_index(blobs: "BlobStore", records: "SociRecords", image: "LocalImage", ref: str) -> "SociIndex":
    """The v1 index `soci push` sends for a local image: the newest built for its manifest
    (v2 indexes travel inside a converted image instead)."""
    from lazyoci.soci.index import SociIndex

    all_recs = records.indexes(manifest_digest=image.manifest.digest)
    recs = [r for r in all_recs if r.version == "v1"]
    if not recs and all_recs:
        raise StoreError(f"{ref} only has SOCI v2 indexes: they travel inside the converted image, "
                         "push it with `lazyoci push`")
    if not recs:
        raise StoreError(f"no v1 SOCI index for {ref} ({image.config.platform}): "
                         "run `lazyoci soci create` first")
    return SociIndex.parse(blobs.read(recs[-1].index_digest))


def push_local_index(images: "LocalImages", blobs: "BlobStore", records: "SociRecords",
                     client: "RegistryClient", ref: str, platform: "Platform | None" = None,
                     log: Log = lambda line: None, existing: str = "warn") -> "PushResult":
    """Push the newest v1 SOCI index of local image `ref` to `ref`'s repository."""
    from lazyoci.soci.push import push_index

    image = images.get(ref, platform)
    index = newest_v1_index(blobs, records, image, ref)
    return push_index(client, Reference.parse(ref), blobs, index, log, existing)


def build_and_push_index(images: "LocalImages", blobs: "BlobStore", records: "SociRecords",
                         new_lease: "Callable[[], Lease]", client: "RegistryClient", ref: str,
                         options: "SociBuildOptions", platform: "Platform | None" = None,
                         log: Log = lambda line: None, existing: str = "warn") -> str:
    """Build (or reuse) the v1 SOCI index of local image `ref` and push it next to the image,
    once the image itself is pushed; returns the index digest. A layer the store lacks is
    streamed from `client` (a lazily pulled image)."""
    from lazyoci.soci.build import build_index, layer_source
    from lazyoci.soci.push import push_index

    image = images.get(ref, platform)
    with new_lease() as lease:
        result = build_index(image, layer_source(blobs, lambda: client, image), blobs, records, lease,
                             options, log)
    push_index(client, Reference.parse(ref), blobs, result.index, log, existing)
    return result.digest
