"""`pull --snapshotter soci`: fetch the SOCI index and zTOCs, download only unindexed layers.

Steps: resolve the image (and the platform's manifest), discover its SOCI index
(explicit digest, v2 annotation, referrers API, tag schema — D's discover_index),
store the index manifest and the zTOCs as blobs owned by `soci:<index digest>`,
record which layer each zTOC serves, then let ImageService.pull fetch the image
while skipping the lazy layers (no progress rows for them, as the seed shows).
Finally the layer snapshots are committed and the service mounts the lazy layers.

No index, an unreadable one, or one without any zTOC for the image's layers:
every layer is downloaded (with rows), the image is recorded as `overlayfs`
(it is NOT lazy, and is never reported so) and one INFO line says why.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable

from lazyoci.errors import LazyociError
from lazyoci.oci.manifest import Index, Manifest, parse_any
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService, LocalImage
    from lazyoci.snapshot.soci import SociSnapshotter


def _resolve_manifest(client, ref: Reference, platform: Platform | None) -> tuple[Manifest, str]:
    raw, media_type, digest = client.get_manifest(ref)
    obj = parse_any(raw, media_type)
    if isinstance(obj, Index):
        desc = obj.select(platform or Platform.host())
        raw, media_type, digest = client.get_manifest(ref.with_digest(desc.digest))
        obj = Manifest.parse(raw, media_type)
    return obj, digest


def _store_blob(images: "ImageService", client, ref: Reference, digest: str, size: int | None,
                owner: str, raw: bytes | None = None) -> None:
    """Store a small blob (index manifest `raw`, or a zTOC downloaded here), owned by `owner`."""
    with images.lease() as lease:
        lease.add([digest])
        if raw is not None:
            if not images.blobs.has(digest):
                images.blobs.put_bytes(raw, digest)
        elif not images.blobs.has(digest):
            writer = images.blobs.writer(digest, size)
            try:
                for chunk in client.iter_blob(ref, digest, size):
                    writer.write(chunk)
                writer.commit()
            except BaseException:
                writer.abort()
                raise
        with images.db.transaction() as c:
            c.execute("INSERT OR IGNORE INTO blob_refs (owner, digest) VALUES (?, ?)", (owner, digest))


def lazy_pull(snap: "SociSnapshotter", images: "ImageService", ref: str, platform: Platform | None = None,
              progress=None, log: Callable[[str], None] | None = None,
              index_digest: str | None = None) -> "LocalImage":
    from lazyoci.snapshot.soci import LazyLayerRecord
    from lazyoci.soci import discover_index      # D's discovery

    # The INFO line of a fallback must reach the user even when the caller gave no log.
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    reference = Reference.parse(ref)
    client = images.client
    manifest, manifest_digest = _resolve_manifest(client, reference, platform)
    reason = None
    lazy: dict[str, str] = {}
    try:
        found = discover_index(client, reference, manifest, manifest_digest, explicit_digest=index_digest)
    except LazyociError as e:
        if index_digest:          # asked for explicitly: an error, not a silent fallback
            raise
        found, reason = None, f"the SOCI index cannot be read ({e})"
    if found is None and reason is None:
        reason = "no SOCI index was found"
    if found is not None:
        snap.service.spawn()        # the daemon starts while the zTOCs and the image download
        source = f"{reference.name}@{manifest_digest}"
        owner = f"soci:{found.digest}"
        try:
            _store_blob(images, client, reference, found.digest, None, owner, raw=found.manifest.raw)
            for layer in manifest.layers:
                zdesc = found.ztocs.get(layer.digest)
                if zdesc is None:
                    continue
                _store_blob(images, client, reference, zdesc.digest, zdesc.size, owner)
                snap.record_lazy_layer(LazyLayerRecord(layer.digest, zdesc.digest, source, found.digest))
                lazy[layer.digest] = zdesc.digest
        except LazyociError as e:
            lazy, reason = {}, f"the SOCI index {found.digest} cannot be read ({e})"
        if not lazy and reason is None:
            reason = f"the SOCI index {found.digest} has no zTOC for any layer of the image"
    if reason is not None:
        say(f"INFO: {reason} for {reference}: downloading every layer before the container starts "
            f"(no lazy loading)")
    image = images.pull(ref, platform, progress,
                        layer_consumer=snap.layer_consumer,
                        skip_layers=(lambda d: d.digest in lazy) if lazy else None,
                        snapshotter="soci" if lazy else "overlayfs")
    snap.unpack_image(images, image)
    if lazy:
        snap.service.ensure_running()
        for layer_digest in lazy:
            rec = snap.lazy_layer(layer_digest)
            snap.service.mount_layer(rec.ref, rec.layer_digest, rec.ztoc_digest)
    return image
