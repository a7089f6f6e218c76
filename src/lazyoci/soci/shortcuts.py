"""The library API for pipelines: zTOCs from file objects, zTOCs from bytes, an index for an image.

    from lazyoci.soci import build_ztoc, parse_ztoc, build_index_for_reference
    with open("layer.tar.gz", "rb") as f:
        data = build_ztoc(f, "gzip")
    print(parse_ztoc(data).num_spans)
    result = build_index_for_reference("registry.example/app:1.0", remote=True, push=True)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from lazyoci.soci.build import SociBuildOptions, SociIndexResult

if TYPE_CHECKING:
    from lazyoci.oci.platform import Platform
    from lazyoci.registry.options import RegistryOptions
    from lazyoci.ztoc import Ztoc


def build_ztoc(fileobj: BinaryIO, compression: str = "gzip", span_size: int = 1 << 22,
               build_tool: str | None = None, large_span_size: int | None = None) -> bytes:
    """A zTOC for the layer read from `fileobj` ("gzip" or "none"), in one pass, laid out as
    `soci create` lays it out (`large_span_size`: None for its default, 0 for none)."""
    from lazyoci import ztoc
    from lazyoci.soci.build import DEFAULT_LARGE_SPAN_SIZE
    large = DEFAULT_LARGE_SPAN_SIZE if large_span_size is None else large_span_size
    return ztoc.build_ztoc(fileobj, compression, span_size, build_tool or ztoc.BUILD_TOOL, large)


def parse_ztoc(data: bytes) -> "Ztoc":
    """A zTOC (written by lazyoci or by the reference) from its bytes; FormatError if malformed."""
    from lazyoci.ztoc import Ztoc
    return Ztoc.parse(data)


def build_index_for_reference(ref: str, root: Path | None = None,
                              options: SociBuildOptions | None = None,
                              platform: "Platform | None" = None, remote: bool = False, push: bool = False,
                              registry: "RegistryOptions | None" = None,
                              log: Callable[[str], None] = lambda line: None) -> SociIndexResult:
    """Build the v1 SOCI index of image `ref`: from the local store under `root`, or with
    `remote` by streaming its layers from the registry (nothing but zTOCs is stored);
    with `push`, push the index next to the image."""
    from lazyoci.config import default_root
    from lazyoci.images.service import ImageService
    from lazyoci.oci.reference import Reference
    from lazyoci.registry.options import RegistryOptions
    from lazyoci.soci.image_service_wiring import index_local_image, index_remote_image
    from lazyoci.soci.push import push_index
    from lazyoci.store.layout import DataRoot

    images = ImageService(DataRoot(root or default_root()), registry or RegistryOptions())
    try:
        if remote:
            options = options or SociBuildOptions()
            result, _ = index_remote_image(images, ref, options, platform, push, log)
            return result
        result = index_local_image(images, images.get(ref, platform), options, log)
        if push:
            push_index(images.client, Reference.parse(ref), images.blobs, result.index, log)
        return result
    finally:
        images.close()
