"""Pull time: find the zstd:chunked layers of an image and fetch their TOCs, checked.

A layer is lazy through its own TOC when its media type is tar+zstd and it carries
the zstd:chunked annotations (zstdchunked/annotations.py). Its TOC is fetched with
one Range request, checked against the `manifest-checksum` annotation before a byte
of it is decoded, then parsed with every check the service makes and the one only
the pull can make (no frame past the TOC, whose place the annotation gives). The
checked bytes are what the service mounts: their digest is the view's key. A plain
zstd layer (no annotations) is downloaded whole, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from lazyoci.errors import LazyociError
from lazyoci.oci.digest import verify_bytes
from lazyoci.oci.manifest import Descriptor
from lazyoci.oci.mediatypes import layer_compression
from lazyoci.oci.reference import Reference
from lazyoci.zstdchunked.annotations import toc_location
from lazyoci.zstdchunked.toc import MAX_TOC_COMPRESSED_BYTES, ZstdChunkedToc

__all__ = ["ChunkedToc", "RangeReader", "chunked_tocs", "fetch_toc", "is_chunked_layer"]


class RangeReader(Protocol):
    """What the pull needs of the registry client: bytes [start, end) of a blob."""

    def fetch_range(self, ref: Reference, digest: str, start: int, end: int) -> bytes: ...


@dataclass(frozen=True)
class ChunkedToc:
    """A layer's checked TOC: its compressed bytes (stored as a blob) and their digest."""

    layer_digest: str
    digest: str
    data: bytes
    index: ZstdChunkedToc


def is_chunked_layer(layer: Descriptor) -> bool:
    """A tar+zstd layer with zstd:chunked annotations (malformed ones included: fetch_toc says why)."""
    from lazyoci.zstdchunked.annotations import PREFIXES

    try:
        zstd = layer_compression(layer.media_type) == "zstd"
    except LazyociError:
        return False
    return zstd and any(k.startswith(PREFIXES) for k in layer.annotations)


def fetch_toc(client: RangeReader, ref: Reference, layer: Descriptor) -> ChunkedToc:
    """The layer's TOC, fetched and checked; a LazyociError says why it cannot be used."""
    loc = toc_location(layer.annotations, layer.size)
    if loc is None:
        raise LazyociError(f"layer {layer.digest} has no zstd:chunked annotations")
    MAX_TOC_COMPRESSED_BYTES.check(loc.length, f"the zstd:chunked TOC of layer {layer.digest}")
    data = client.fetch_range(ref, layer.digest, loc.offset, loc.offset + loc.length)
    verify_bytes(data, loc.checksum, f"zstd:chunked TOC of layer {layer.digest}")
    index = ZstdChunkedToc.parse(data, loc.checksum, loc.data_end, loc.uncompressed_length)
    return ChunkedToc(layer.digest, loc.checksum, data, index)


def chunked_tocs(client: RangeReader, ref: Reference, layers: Sequence[Descriptor], skip: Collection[str],
                 refuse: Callable[[str], None]) -> dict[str, ChunkedToc]:
    """The checked TOCs of the zstd:chunked layers not in `skip` (layers lazy otherwise), by layer
    digest. A TOC that cannot be used is a phrase to `refuse` (the pull says them in one INFO
    line); its layer is downloaded."""
    out: dict[str, ChunkedToc] = {}
    for layer in layers:
        if layer.digest in skip or layer.digest in out or not is_chunked_layer(layer):
            continue
        try:
            out[layer.digest] = fetch_toc(client, ref, layer)
        except LazyociError as e:
            refuse(f"the zstd:chunked TOC of layer {layer.digest} cannot be used ({e})")
    return out
