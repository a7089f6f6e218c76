"""Where an `ImageService`'s parts are handed to the SOCI functions.

The functions in `build`, `remote`, `convert` and `publish` take the blob store, the SOCI records,
a lease and a registry client they need, not the whole service; this is the one place
(for the CLI and the pipeline shortcuts) that takes them out of a service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lazyoci.soci.build import SociBuildOptions, SociIndexResult, build_index, layer_source
from lazyoci.soci.index_records import SociRecords

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService, LocalImage
    from lazyoci.oci.platform import Platform
    from lazyoci.soci.convert import ConvertResult
    from lazyoci.soci.push import PushResult
    from lazyoci.store.image_records import Lease

__all__ = ["build_and_push_local_image_index", "convert_local_image", "index_local_image",
           "index_remote_image", "push_local_image_index"]

Log = Callable[[str], None]


def index_local_image(images: "ImageService", image: "LocalImage", options: SociBuildOptions | None = None,
                      log: Log = lambda line: None, lease: "Lease | None" = None) -> SociIndexResult:
    """`build_index` over the service's store: layers it lacks come from the image's registry."""
    if lease is None:
        with images.lease() as own_lease:
            return index_local_image(images, image, options, log, own_lease)
    return build_index(image, layer_source(images.blobs, lambda: images.client, image), images.blobs,
                       SociRecords(images.db), lease, options, log)


def index_remote_image(images: "ImageService", ref: str, options: SociBuildOptions | None = None,
                       platform: "Platform | None" = None, push: bool = False,
                       log: Log = lambda line: None) -> "tuple[SociIndexResult, PushResult | None]":
    """`create_remote` with the service's registry client, storing into the service's store."""
    from lazyoci.soci.remote import create_remote
    return create_remote(images.client, images.blobs, SociRecords(images.db), images.lease, ref,
                         options, platform, push, log)


def convert_local_image(images: "ImageService", src: str, dst: str, options: SociBuildOptions | None = None,
                        platforms: "list[Platform] | None" = None, all_platforms: bool = False,
                        log: Log = lambda line: None) -> "ConvertResult":
    """`convert` within the service's store: the SOCI v2 image `dst` made from local image `src`."""
    from lazyoci.soci.convert import convert
    return convert(images, images.records, images.blobs, SociRecords(images.db), lambda: images.client,
                   src, dst, options, platforms, all_platforms, log)


def push_local_image_index(images: "ImageService", ref: str, platform: "Platform | None" = None,
                           log: Log = lambda line: None, existing: str = "warn") -> "PushResult":
    """`push_local_index` from the service's store with its registry client."""
    from lazyoci.soci.publish import push_local_index
    return push_local_index(images, images.blobs, SociRecords(images.db), images.client, ref, platform,
                            log, existing)


def build_and_push_local_image_index(images: "ImageService", ref: str, options: SociBuildOptions,
                                     platform: "Platform | None" = None, log: Log = lambda line: None,
                                     existing: str = "warn") -> str:
    """`build_and_push_index` over the service's store with its registry client."""
    from lazyoci.soci.publish import build_and_push_index
    return build_and_push_index(images, images.blobs, SociRecords(images.db), images.lease, images.client,
                                ref, options, platform, log, existing)
