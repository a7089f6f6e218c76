"""`soci create --remote [--push] REF`: index an image that is only in a registry.

For CI pipelines that hold no local copy: each large layer is streamed from the
registry once, straight into the zTOC builder (verified against its digest as it
passes), and never stored; only the zTOCs and the index are kept, then pushed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazyoci.errors import FormatError, IntegrityError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.digest import verify_bytes
from lazyoci.oci.manifest import Descriptor, ImageConfig, Index, Manifest
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference
from lazyoci.soci.build import (SociBuildOptions, SociIndexResult, build_prefetch_artifacts, build_ztocs,
                                 store_index)
from lazyoci.soci.index import make_index
from lazyoci.soci.push import PushResult, push_index
from lazyoci.soci.index_records import SociRecords

if TYPE_CHECKING:
    from lazyoci.registry import RegistryClient
    from lazyoci.store.blobs import BlobStore
    from lazyoci.store.image_records import Lease

Log = Callable[[str], None]


@dataclass(frozen=True)
class RemoteImage:
    ref: Reference
    top_digest: str
    manifest: Manifest
    config: ImageConfig


def resolve_remote(client: "RegistryClient", ref: Reference, platform: Platform | None) -> RemoteImage:
    """The platform's image manifest and config, fetched and verified (no layers)."""
    raw, media_type, top = client.get_manifest(ref)
    if media_type in mt.IMAGE_INDEXES:
        chosen = Index.parse(raw, media_type).select(platform or Platform.host())
        raw, media_type, got = client.get_manifest(ref.with_digest(chosen.digest))
        if got != chosen.digest:
            raise IntegrityError(f"manifest {chosen.digest}: registry sent {got}", chosen.digest, got)
    manifest = Manifest.parse(raw, media_type)
    cfg = b"".join(client.iter_blob(ref, manifest.config.digest, manifest.config.size))
    verify_bytes(cfg, manifest.config.digest, "image config")
    config = ImageConfig.parse(cfg)
    if platform is not None and not platform.matches(config.platform):
        raise FormatError(f"{ref} is a {config.platform} image, not {platform}")
    return RemoteImage(ref, top, manifest, config)


def create_remote(client: "RegistryClient", blobs: "BlobStore", records: SociRecords,
                  new_lease: "Callable[[], Lease]", ref: str, options: SociBuildOptions | None = None,
                  platform: Platform | None = None, push: bool = False,
                  log: Log = lambda line: None) -> tuple[SociIndexResult, PushResult | None]:
    """Build a v1 SOCI index for an image in a registry, streaming each layer once; push it if asked.

    `new_lease` guards the new zTOCs and index from `gc` until their records are written."""
    options = options or SociBuildOptions()
    if options.version != "v1":
        raise FormatError("remote mode builds v1 indexes (a v2 index changes the image: use convert)")
    r = Reference.parse(ref)
    remote = resolve_remote(client, r, platform)

    def open_layer(layer: Descriptor):
        return client.iter_blob(r, layer.digest, layer.size)

    mdesc = remote.manifest.descriptor()
    with new_lease() as lease:
        built, skipped = build_ztocs(remote.manifest, open_layer, options, blobs, records, log, lease)
        if not built:
            raise FormatError(
                f"no zTOCs created for {r}: all {len(remote.manifest.layers)} layers are smaller than "
                f"min-layer-size {options.min_layer_size} or compressed with an unsupported format")
        prefetch = build_prefetch_artifacts(blobs, built, options.prefetch_files, log, lease)
        index = make_index("v1", [b.ztoc for b in built] + prefetch, mdesc, options.tool)
        store_index(blobs, records, index, mdesc, remote.top_digest, str(r),
                    remote.config.platform, "built", lease)
    result = SociIndexResult(index, mdesc, remote.config.platform, tuple(built), tuple(skipped))
    pushed = push_index(client, r, blobs, index, log) if push else None
    return result, pushed
