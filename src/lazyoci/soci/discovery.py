"""Find the SOCI index of an image in its registry, as the reference snapshotter does.

Order: an explicit index digest; the image manifest's `com.amazon.soci.index-digest`
annotation (v2); the referrers API, which the registry client falls back from to
the `sha256-<hex>` tag schema (v1). Whatever is found is fetched by digest and
verified; with a blob store given, the index and its zTOCs are stored there
(verified) so that the lazy filesystem can read them locally.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazyoci.errors import FormatError, IntegrityError, NotFoundError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.digest import Digest
from lazyoci.oci.manifest import Descriptor, Manifest
from lazyoci.oci.reference import Reference
from lazyoci.soci.index import ANN_INDEX_DIGEST, SociIndex

if TYPE_CHECKING:
    from lazyoci.registry import RegistryClient
    from lazyoci.soci.index_records import SociRecords
    from lazyoci.store.blobs import BlobStore

Log = Callable[[str], None]


@dataclass(frozen=True)
class DiscoveredIndex:
    digest: str
    manifest: Manifest                 # the SOCI index as an OCI manifest
    ztocs: dict[str, Descriptor]       # image layer digest -> zTOC descriptor
    how: str = "referrers"             # "explicit" | "annotation" | "referrers"

    @property
    def index(self) -> SociIndex:
        return SociIndex.parse(self.manifest.raw)


def fetch_index(client: "RegistryClient", ref: Reference, digest: str) -> SociIndex:
    """The SOCI index `digest` of `ref`'s repository, verified (a lazy pull given the digest fetches
    it while it resolves the image, then hands it to discover_index as `explicit`)."""
    Digest.parse(digest)
    raw, _media_type, got = client.get_manifest(ref.with_digest(digest))
    if got != digest:
        raise IntegrityError(f"SOCI index {digest}: registry sent {got}", expected=digest, actual=got)
    return SociIndex.parse(raw)


def _discovered(index: SociIndex, image_manifest: Manifest, how: str) -> DiscoveredIndex:
    layers = {l.digest for l in image_manifest.layers}
    ztocs = {layer: d for layer, d in index.layer_map().items() if layer in layers}
    if not ztocs:
        raise FormatError(f"SOCI index {index.digest} has no zTOC for any layer of this image")
    return DiscoveredIndex(index.digest, Manifest.parse(index.raw), ztocs, how)


def discover_index(client: "RegistryClient", ref: Reference, image_manifest: Manifest,
                   image_manifest_digest: str, explicit_digest: str | None = None,
                   blobs: "BlobStore | None" = None, log: Log = lambda line: None,
                   records: "SociRecords | None" = None, explicit: SociIndex | None = None) -> DiscoveredIndex | None:
    """The image's SOCI index, or None when it has none (then every layer is fetched whole).
    `explicit`: the index the caller asked for, fetched already (fetch_index)."""
    found: DiscoveredIndex | None = None
    if explicit is not None:
        found = _discovered(explicit, image_manifest, "explicit")
    elif explicit_digest:
        # Asked for by the user: a missing or broken index is an error, not a fallback.
        found = _discovered(fetch_index(client, ref, explicit_digest), image_manifest, "explicit")
    if found is None:
        annotated = image_manifest.annotations.get(ANN_INDEX_DIGEST)
        if annotated:
            try:
                found = _discovered(fetch_index(client, ref, annotated), image_manifest, "annotation")
            except NotFoundError:
                log(f"soci: index {annotated} named by the image manifest is not in {ref.name}")
    if found is None:
        for d in client.referrers(ref, image_manifest_digest, mt.SOCI_INDEX_V1):
            if d.artifact_type not in (None, mt.SOCI_INDEX_V1):
                continue
            index = fetch_index(client, ref, d.digest)
            if index.subject is None or index.subject.digest != image_manifest_digest:
                log(f"soci: referrer {d.digest} does not name {image_manifest_digest} as subject; ignored")
                continue
            found = _discovered(index, image_manifest, "referrers")
            break        # the reference takes the first referrer
    if found is not None and blobs is not None:
        fetch_artifacts(client, ref, found, blobs, records, image_manifest)
    return found


def fetch_artifacts(client: "RegistryClient", ref: Reference, found: DiscoveredIndex,
                    blobs: "BlobStore", records: "SociRecords | None" = None,
                    image_manifest: Manifest | None = None) -> None:
    """Store the index and its zTOCs locally, each verified against its digest and size
    (and parsed: a zTOC that is not one is refused before anyone serves from it).
    With `records`, remember them so that `soci ztoc`/`soci index` commands see them."""
    import time

    from lazyoci.soci.index import ANN_LAYER_MEDIA_TYPE, ANN_SPAN_SIZE
    from lazyoci.soci.index_records import ZtocRecord
    from lazyoci.ztoc import Ztoc

    if not blobs.has(found.digest):
        blobs.put_bytes(found.manifest.raw, found.digest)
    sizes = {l.digest: l for l in image_manifest.layers} if image_manifest else {}
    for layer, d in found.ztocs.items():
        if not blobs.has(d.digest):
            with blobs.writer(d.digest, d.size) as w:
                for chunk in client.iter_blob(ref, d.digest, d.size):
                    w.write(chunk)
                w.commit()
        try:
            z = Ztoc.parse(blobs.read(d.digest))
        except FormatError as e:
            blobs.delete(d.digest)
            raise FormatError(f"zTOC {d.digest} for layer {layer}: {e}") from None
        if records is not None and layer in sizes:
            span = d.annotations.get(ANN_SPAN_SIZE)
            records.put_ztoc(ZtocRecord(layer, int(span) if span else z.span_size, d.digest, d.size,
                                        d.annotations.get(ANN_LAYER_MEDIA_TYPE, sizes[layer].media_type),
                                        sizes[layer].size, time.time()))
