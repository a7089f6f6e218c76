"""Where a zstd:chunked layer keeps its TOC, as its descriptor's annotations say.

containers/storage writes two annotations on a zstd:chunked layer: the TOC's
position in the blob ("offset:length:uncompressed length:manifest type") and the
sha256 of its compressed bytes. Debian's skopeo 1.9 spells them with the prefix
`io.containers.`, newer containers/storage with `io.github.containers.`; both are
read. The annotations are part of the image manifest, whose digest the pull
checks, so a TOC whose bytes have the annotated digest is the one the image's
author published.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lazyoci.errors import FormatError
from lazyoci.oci.digest import Digest

__all__ = ["PREFIXES", "TocLocation", "toc_location"]

PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
CHECKSUM_KEY = "manifest-checksum"
POSITION_KEY = "manifest-position"
MANIFEST_TYPE_CRFS = 1          # the only TOC encoding containers/storage writes (JSON entries)
SKIPPABLE_HEADER = 8            # a zstd skippable frame's magic and length, just before the TOC


@dataclass(frozen=True)
class TocLocation:
    """The TOC of one layer: its compressed bytes at [offset, offset + length) of the blob."""

    offset: int
    length: int
    uncompressed_length: int
    checksum: str               # sha256 of the compressed TOC bytes

    @property
    def data_end(self) -> int:
        """Where the file frames must end: the TOC's skippable frame header starts here."""
        return self.offset - SKIPPABLE_HEADER


def toc_location(annotations: Mapping[str, str], blob_size: int) -> TocLocation | None:
    """The layer's TOC location, None for a layer without zstd:chunked annotations; FormatError
    for annotations that are malformed or place the TOC outside a blob of `blob_size` bytes."""
    for prefix in PREFIXES:
        checksum = annotations.get(prefix + CHECKSUM_KEY)
        position = annotations.get(prefix + POSITION_KEY)
        if checksum is None and position is None:
            continue
        if checksum is None or position is None:
            raise FormatError(f"zstd:chunked layer has {prefix}{CHECKSUM_KEY if checksum is None else POSITION_KEY}"
                              " missing (both annotations are needed)")
        digest = Digest.parse(checksum)
        if digest.algorithm != "sha256":
            raise FormatError(f"zstd:chunked manifest checksum {checksum!r} is not a sha256 digest")
        parts = position.split(":")
        # ASCII digits of at most 20 (a 64-bit number): `int` refuses "²" and 4,300 digits with a ValueError
        if len(parts) != 4 or not all(p.isascii() and p.isdigit() and len(p) <= 20 for p in parts):
            raise FormatError(f"zstd:chunked manifest position {position!r} is not offset:length:size:type")
        offset, length, size, kind = (int(p) for p in parts)
        if kind != MANIFEST_TYPE_CRFS:
            raise FormatError(f"zstd:chunked manifest type {kind} is not supported (want {MANIFEST_TYPE_CRFS})")
        if offset < SKIPPABLE_HEADER or length <= 0 or offset + length > blob_size:
            raise FormatError(f"zstd:chunked TOC at [{offset}, {offset + length}) lies outside "
                              f"the {blob_size}-byte layer")
        return TocLocation(offset, length, size, str(digest))
    return None
