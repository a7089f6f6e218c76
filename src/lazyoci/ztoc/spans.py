"""Span extraction: verify a span's compressed bytes, inflate it, read any byte range.

Lazy loading stands on this: a file's bytes are served by fetching only the
spans that hold them, each checked against its digest before it is inflated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from lazyoci.errors import FormatError, IntegrityError
from lazyoci.ztoc.zinfo import SpanInflater, inflate_span

if TYPE_CHECKING:     # the reader calls these for its own spans
    from lazyoci.ztoc.reader import Ztoc


def verify_span(ztoc: Ztoc, i: int, compressed: bytes) -> None:
    """IntegrityError unless `compressed` is exactly span i's bytes (by its digest)."""
    _check_digest(ztoc, i, hashlib.sha256(compressed))


def _check_digest(ztoc: Ztoc, i: int, hashed: "hashlib._Hash") -> None:
    expected = ztoc.span_digest(i)
    actual = "sha256:" + hashed.hexdigest()
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


class SpanReceiver:
    """Span i's compressed bytes taken as they arrive: hashed, and inflated as they come.

    finish() checks the digest first, so a span whose bytes do not match is an IntegrityError
    (fetched again) even where they did not inflate either; only verified bytes that do not
    inflate are a FormatError, an error of the zTOC itself, as with verify_span then
    decompress_span."""

    def __init__(self, ztoc: Ztoc, i: int) -> None:
        self._ztoc = ztoc
        self._i = i
        cstart, cend = ztoc.span_compressed_range(i)
        ustart, uend = ztoc.span_uncompressed_range(i)
        self._want = cend - cstart
        self._length = uend - ustart
        self._got = 0
        self._hash = hashlib.sha256()
        points = ztoc.checkpoints
        # an uncompressed layer's span is its bytes (padding after the archive's end cut off)
        self._plain = points is None
        self._inflater = SpanInflater(points, i, self._length) if points is not None and self._length > 0 else None
        self._kept: list[bytes] = []
        self._error: FormatError | None = None

    def feed(self, piece: bytes) -> None:
        self._got += len(piece)
        self._hash.update(piece)
        if self._plain:
            self._kept.append(piece)
        elif self._inflater is not None and self._error is None:
            try:
                self._inflater.feed(piece)
            except FormatError as e:      # judged once the digest says whose error it is
                self._error = e

    def finish(self) -> bytes:
        """The span's verified bytes: IntegrityError if they are not its bytes, FormatError if
        they are and do not inflate into it."""
        try:
            if self._got != self._want:
                raise IntegrityError(f"short read ({self._got} of {self._want} bytes)")
            _check_digest(self._ztoc, self._i, self._hash)
            if self._error is not None:
                raise self._error
            if self._plain:
                return b"".join(self._kept)[:self._length]
            if self._inflater is None:
                return b""
            return self._inflater.finish()
        finally:
            self.close()

    def close(self) -> None:
        if self._inflater is not None:
            self._inflater.close()
        self._kept = []


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
