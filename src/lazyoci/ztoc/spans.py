"""Span extraction: verify a span's compressed bytes, inflate it, read any byte range.

Lazy loading stands on this: a file's bytes are served by fetching only the
spans that hold them, each checked against its digest before it is inflated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from lazyoci.errors import FormatError, IntegrityError
from lazyoci.ztoc.zinfo import inflate_span

if TYPE_CHECKING:     # the reader calls these for its own spans
    from lazyoci.ztoc.reader import Ztoc


def verify_span(ztoc: Ztoc, i: int, compressed: bytes) -> None:
    """IntegrityError unless `compressed` is exactly span i's bytes (by its digest)."""
    expected = ztoc.span_digest(i)
    actual = "sha256:" + hashlib.sha256(compressed).hexdigest()
    if actual != expected:
        raise IntegrityError(f"span {i} digest mismatch: expected {expected}, got {actual}",
                             expected=expected, actual=actual)


def decompress_span(ztoc: Ztoc, i: int, compressed: bytes) -> bytes:
    """The exact uncompressed bytes of span i; `compressed` = blob[span_compressed_range(i)].

    Does not verify the digest (call verify_span first with fetched bytes)."""
    cstart, cend = ztoc.span_compressed_range(i)
    if len(compressed) != cend - cstart:
        raise FormatError(f"span {i}: got {len(compressed)} compressed bytes, expected {cend - cstart}")
    ustart, uend = ztoc.span_uncompressed_range(i)
    if ztoc.checkpoints is None:      # zero padding after the archive's end is not served
        return bytes(compressed[:uend - ustart])
    return inflate_span(ztoc.checkpoints, i, compressed, uend - ustart)


def read_range(ztoc: Ztoc, fetch: Callable[[int, int], bytes], start: int, end: int) -> bytes:
    """Uncompressed bytes [start, end) of the tar stream, fetching and verifying only the spans that
    hold them. `fetch(a, b)` returns blob bytes [a, b) (one call for the whole run of spans)."""
    spans = ztoc.spans_for(start, end)
    if not spans:
        return b""
    first_c = ztoc.span_compressed_range(spans[0])[0]
    last_c = ztoc.span_compressed_range(spans[-1])[1]
    blob = fetch(first_c, last_c)
    if len(blob) != last_c - first_c:
        raise IntegrityError(f"fetched {len(blob)} bytes for blob range [{first_c}, {last_c})")
    parts = []
    view = memoryview(blob)
    for i in spans:
        cs, ce = ztoc.span_compressed_range(i)
        piece = bytes(view[cs - first_c:ce - first_c])
        verify_span(ztoc, i, piece)
        data = decompress_span(ztoc, i, piece)
        us, _ = ztoc.span_uncompressed_range(i)
        parts.append(data[max(start - us, 0):max(min(end - us, len(data)), 0)])
    return b"".join(parts)
