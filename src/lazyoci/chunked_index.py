"""What the indexes whose spans are chunks of the files' contents share (eStargz's TOC,
zstd:chunked's TOC): finding a span by its place in the stream or its number, and the
length check of fetched bytes (their digests cover the decoded chunks, which each
format checks in its own `decompress_span`).

It implements part of fs/layer_index.py's `LayerIndex` by shape, as the formats do."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from typing import Generic, Protocol, TypeVar

from lazyoci.errors import FormatError, IntegrityError


class SpanRanges(Protocol):
    @property
    def cstart(self) -> int: ...      # compressed range in the layer blob
    @property
    def cend(self) -> int: ...
    @property
    def ustart(self) -> int: ...      # range in the stream of file contents
    @property
    def uend(self) -> int: ...


class StreamEntry(Protocol):
    @property
    def offset(self) -> int: ...      # where the entry's data starts in the stream
    @property
    def size(self) -> int: ...
    @property
    def xattrs(self) -> Mapping[str, bytes]: ...


E = TypeVar("E", bound=StreamEntry)
S = TypeVar("S", bound=SpanRanges)


class ChunkedIndex(Generic[E, S]):
    """Entries and spans in stream order; `what` names the index in errors ("the eStargz TOC")."""

    headers_in_stream = False     # the stream is file data alone: fs/header_check.py cannot apply
    spans_within_files = True     # a span is a chunk of one file: read-ahead goes on into the next files

    def __init__(self, digest: str, entries: list[E], spans: list[S], what: str) -> None:
        self._digest = digest
        self._entries = entries
        self._spans = spans
        self._ustarts = [s.ustart for s in spans]
        self._what = what
        self._xattrs_anywhere = any(e.xattrs for e in entries)

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def uncompressed_size(self) -> int:
        return self._spans[-1].uend if self._spans else 0

    @property
    def num_spans(self) -> int:
        return len(self._spans)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def may_have_xattrs(self) -> bool:
        return self._xattrs_anywhere

    def entry(self, i: int) -> E:
        return self._entries[i]

    def entry_extent(self, i: int) -> tuple[int, int]:
        e = self._entries[i]
        return e.offset, e.size

    def spans_for(self, start: int, end: int) -> range:
        start, end = max(start, 0), min(end, self.uncompressed_size)
        if end <= start:
            return range(0)
        return range(bisect_right(self._ustarts, start) - 1, bisect_right(self._ustarts, end - 1))

    def _span(self, i: int) -> S:
        if not 0 <= i < len(self._spans):
            raise FormatError(f"span {i} out of range: {self._what} has {len(self._spans)} spans")
        return self._spans[i]

    def span_uncompressed_range(self, i: int) -> tuple[int, int]:
        s = self._span(i)
        return s.ustart, s.uend

    def span_compressed_range(self, i: int) -> tuple[int, int]:
        s = self._span(i)
        return s.cstart, s.cend

    def verify_span(self, i: int, compressed: bytes) -> None:
        """The length only: the digests cover the decoded chunks (`decompress_span`)."""
        s = self._span(i)
        if len(compressed) != s.cend - s.cstart:
            raise IntegrityError(f"span {i}: got {len(compressed)} bytes, expected {s.cend - s.cstart}")
