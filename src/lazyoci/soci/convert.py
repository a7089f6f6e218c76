"""`soci convert SRC DST`: make a SOCI v2 image (index inside the image) from a local image.

The v2 SOCI indexes are built first (they have no subject, so their digests do not
depend on the rewritten manifests); `convert_shape` then rewrites the manifests and
the OCI index; everything is stored and DST is recorded as a new local image that
owns the original layers, the new manifests and the SOCI artifacts, so that a plain
`lazyoci push DST` carries the index with the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from lazyoci.errors import FormatError, ImageNotFoundError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import Manifest
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference
from lazyoci.soci.build import SociBuildOptions, SociIndexResult, build_index, layer_source
from lazyoci.soci.v2_documents import PlatformIndex, convert_shape
from lazyoci.soci.index import EMPTY_CONFIG_DIGEST
from lazyoci.soci.index_records import SociRecords

if TYPE_CHECKING:
    from lazyoci.registry.client import RegistryClient
    from lazyoci.soci.local_images import LocalImages
    from lazyoci.store.blobs import BlobStore
    from lazyoci.store.image_records import ImageRecords

Log = Callable[[str], None]


@dataclass(frozen=True)
class ConvertResult:
    name: str                                # DST, normalised
    digest: str                              # the new OCI image index
    indexes: tuple[SociIndexResult, ...]     # one per converted platform
    manifests: dict[str, str]                # old manifest digest -> new manifest digest


def _platforms_to_index(images: "LocalImages", image_records: "ImageRecords", src: str,
                        platforms: list[Platform] | None, all_platforms: bool
                        ) -> tuple[list[tuple[str, Platform, str]], str, str]:
    """(manifest, platform, config) rows to index, the image's top digest and media type."""
    first = images.get(src) if not platforms else images.get(src, platforms[0])
    top = first.digest
    rec = image_records.content(top)
    if rec is None:
        raise ImageNotFoundError(f"no such image: {src}")
    rows = [(m, Platform.parse(p), c) for m, p, c in rec.platforms]
    if rec.media_type in mt.IMAGE_MANIFESTS or all_platforms:
        return rows, top, rec.media_type
    wanted = platforms or [Platform.host()]
    chosen = []
    for want in wanted:
        match = next((r for r in rows if want.matches(r[1])), None)
        if match is None:
            have = ", ".join(str(r[1]) for r in rows) or "none"
            raise ImageNotFoundError(f"image {src} has no {want} platform locally (has: {have})")
        if match not in chosen:
            chosen.append(match)
    return chosen, top, rec.media_type


def convert(images: "LocalImages", image_records: "ImageRecords", blobs: "BlobStore", soci_records: SociRecords,
            client: "Callable[[], RegistryClient]", src: str, dst: str, options: SociBuildOptions | None = None,
            platforms: list[Platform] | None = None, all_platforms: bool = False,
            log: Log = lambda line: None) -> ConvertResult:
    """Convert local image `src` into the SOCI v2 image `dst` (stored locally, not pushed).

    `client` is called only for a layer the store lacks (a lazily pulled source image)."""
    options = replace(options or SociBuildOptions(), version="v2")
    dst_name = str(Reference.parse(dst))
    rows, top, top_type = _platforms_to_index(images, image_records, src, platforms, all_platforms)
    rec = image_records.content(top)
    assert rec is not None
    built: list[SociIndexResult] = []
    attach: list[PlatformIndex] = []
    with image_records.lease() as lease:
        for manifest_digest, platform, _config in rows:
            image = images.get(top, platform)
            if image.manifest.digest != manifest_digest:
                image = replace(image, manifest=Manifest.parse(blobs.read(manifest_digest)))
            try:
                result = build_index(image, layer_source(blobs, client, image), blobs, soci_records, lease,
                                     options, log)
            except FormatError as e:
                if "no zTOCs created" in str(e) and len(rows) > 1:
                    log(f"no SOCI index for platform {platform}: {e}")
                    continue   # another platform may still have large layers, as in the reference
                raise
            built.append(result)
            attach.append(PlatformIndex(manifest_digest, platform, result.index))
        if not attach:
            raise FormatError(f"no zTOCs created for any platform of {src}: every layer is below "
                              f"min-layer-size {options.min_layer_size} or unsupported")
        top_raw = blobs.read(top)
        top_platform = rows[0][1] if top_type in mt.IMAGE_MANIFESTS else None
        local = {m: blobs.read(m) for m, _, _ in rec.platforms}
        shape = convert_shape(top_raw, top_type, top_platform, local, attach)
        lease.add([shape.digest, *shape.manifests])
        for digest, raw in shape.manifests.items():
            blobs.put_bytes(raw, digest)
        blobs.put_bytes(shape.index_raw, shape.digest)

        owned: set[str] = {shape.digest, *shape.manifests}
        new_platforms = []
        for old_digest, plat, config in rec.platforms:
            m = Manifest.parse(local[old_digest])
            owned |= {config, *(l.digest for l in m.layers if blobs.has(l.digest))}
            if old_digest in shape.renamed:
                new_platforms.append((shape.renamed[old_digest], Platform.parse(plat), config))
        for r in built:
            owned |= {r.index.digest, EMPTY_CONFIG_DIGEST, *(z.ztoc.digest for z in r.ztocs)}
        with image_records.transaction() as c:
            image_records.record_content(c, shape.digest, mt.OCI_INDEX, rec.snapshotter, new_platforms, owned)
            image_records.point_name(c, dst_name, shape.digest)
        for r, a in zip(built, attach):
            # The index serves the rewritten manifest, inside the new image, not the original.
            soci_records.remove_index(r.index.digest, a.manifest_digest)
            soci_records.put_index(r.index.digest, shape.renamed[a.manifest_digest], shape.digest, dst_name,
                              str(a.platform), "v2", r.index.size, "built")
    return ConvertResult(dst_name, shape.digest, tuple(built), dict(shape.renamed))
