"""A layer's uncompressed size (SIZE in `images`) when no unpacker counted it during the pull.

A snapshotter that unpacks while downloading counts the uncompressed bytes as it
goes (`snapshot/unpack.py`), so a pull inflates each layer once. Only a layer pulled
without one (the library's plain pull, a layer unpacked already) is inflated here,
from the stored blob, with the same decompressor. A stream that does not decompress
just leaves the size unknown: the unpacker is the one that rejects broken layers.
"""

from __future__ import annotations

from typing import BinaryIO

from lazyoci.oci.compression import decode_errors, open_decompressed

_STEP = 1 << 20


def uncompressed_size(blob: BinaryIO, compression: str) -> int | None:
    """Bytes of the uncompressed stream, or None if it does not decompress."""
    if compression == "none":
        return blob.seek(0, 2)
    try:
        stream = open_decompressed(blob, compression)
        size = 0
        while n := len(stream.read(_STEP)):
            size += n
        return size
    except decode_errors():
        return None
