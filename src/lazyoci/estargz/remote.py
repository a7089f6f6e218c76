"""Fetch an eStargz layer's index from its registry at pull time, and check it.

Two Range requests: the footer (the blob's last 51 bytes), then the tail from the
TOC offset it names to the end. The TOC inside must have the digest of the layer's
`containerd.io/snapshot/stargz/toc.digest` annotation, which the (verified)
manifest carries: only then is the index trusted, and the tail is what lazyoci
stores as the layer's index (its digest keys the lazy view). A layer without the
annotation is not taken for eStargz: its TOC could not be checked before it is used.
"""

from __future__ import annotations

from typing import Protocol

from lazyoci.errors import FormatError, IntegrityError
from lazyoci.estargz.footer import FOOTER_SIZE, parse_footer
from lazyoci.estargz.index import EStargzIndex
from lazyoci.oci.digest import Digest
from lazyoci.oci.manifest import Descriptor
from lazyoci.oci.reference import Reference
from lazyoci.ztoc.limits import MAX_ZTOC_BYTES

__all__ = ["TOC_DIGEST_ANNOTATION", "fetch_index", "is_estargz"]

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
_GZIP_TYPES = ("application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip")


class RangeClient(Protocol):
    def fetch_range(self, ref: Reference, digest: str, start: int, end: int) -> bytes: ...


def is_estargz(layer: Descriptor) -> bool:
    """The layer says it is eStargz: a gzip layer with a TOC digest annotation."""
    return layer.media_type in _GZIP_TYPES and TOC_DIGEST_ANNOTATION in layer.annotations


def fetch_index(client: RangeClient, ref: Reference, layer: Descriptor) -> tuple[bytes, EStargzIndex]:
    """The layer's tail (TOC member and footer) and its parsed index, checked against the
    annotation: FormatError if the layer is not the eStargz it says, IntegrityError if its TOC
    is not the one the manifest names."""
    expected = Digest.parse(layer.annotations.get(TOC_DIGEST_ANNOTATION, ""))
    size = layer.size
    if size < FOOTER_SIZE:
        raise FormatError(f"eStargz layer {layer.digest} of {size} bytes has no room for a footer")
    footer = client.fetch_range(ref, layer.digest, size - FOOTER_SIZE, size)
    if len(footer) != FOOTER_SIZE:
        raise IntegrityError(f"eStargz layer {layer.digest}: got {len(footer)} bytes of its footer")
    toc_offset, _ = parse_footer(footer)
    if not 0 < toc_offset < size - FOOTER_SIZE:
        raise FormatError(f"eStargz layer {layer.digest}: its footer puts the TOC at {toc_offset}, "
                          f"outside the {size}-byte blob")
    MAX_ZTOC_BYTES.check(size - toc_offset, f"the eStargz TOC of layer {layer.digest}")
    tail = client.fetch_range(ref, layer.digest, toc_offset, size)
    if len(tail) != size - toc_offset:
        raise IntegrityError(f"eStargz layer {layer.digest}: got {len(tail)} of {size - toc_offset} TOC bytes")
    index = EStargzIndex.parse(tail)
    if index.toc_digest != str(expected):
        raise IntegrityError(f"eStargz layer {layer.digest}: its TOC has digest {index.toc_digest}, the "
                             f"manifest's annotation says {expected}", expected=str(expected),
                             actual=index.toc_digest)
    return tail, index
