"""The SOCI indexes recorded for a local image: those of every platform manifest stored.

`soci index ls --ref` and `soci index rm --ref` select with this, as the reference's CLI
selects by image: an index built for one platform of a multi-platform image belongs to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lazyoci.images.service import LocalImage
    from lazyoci.soci.index_records import IndexRecord, SociRecords
    from lazyoci.store.image_records import ImageRecords

__all__ = ["indexes_of_image"]


def indexes_of_image(records: "SociRecords", image_records: "ImageRecords",
                     image: "LocalImage") -> "list[IndexRecord]":
    """The index records of `image`'s manifests (all platforms stored), oldest first."""
    rec = image_records.content(image.digest)
    manifests = {m for m, _, _ in rec.platforms} if rec else {image.manifest.digest}
    return [r for r in records.indexes() if r.manifest_digest in manifests]
