"""The layer index: all the lazy filesystem knows of a layer, whatever format indexes it.

A lazy layer is served from an index of its uncompressed tar stream: the entries
(files with their attributes, and where each one's data lies in the stream) and
the spans the stream is cut into. A span is fetched as a range of the compressed
layer blob, verified against its digest in the index before anything uses it,
then decoded into its range of the tar stream. fs/ sees an index only through
these two protocols: a SOCI zTOC (`lazyoci.ztoc.Ztoc`) is one; another lazy
format (eStargz's TOC, zstd:chunked's manifest) is a new class with these
members, in its own folder, and the filesystem, header checks and span fetcher
serve it unchanged.

What an implementation promises (fs/ relies on it; fs/header_check.py still compares
every entry it serves with the entry's own tar header):
- everything it returns was checked when it was parsed: entry offsets inside the
  stream, names the kernel can create, span ranges that tile the stream;
- entry types are "reg", "dir", "symlink", "hardlink", "char", "block", "fifo";
  only "reg" entries carry data, at [offset, offset + size) of the tar stream, and
  each entry's own tar header lies just before its data (fs/header_check.py reads it);
- spans are numbered in stream order: their uncompressed ranges tile the tar stream
  and their compressed ranges go forward, so the ranges of adjacent spans are
  fetched in one request;
- fetched bytes are served only after `verify_span` and then `decompress_span` both
  returned: a format whose digests cover decoded bytes (zstd:chunked's chunk digests,
  eStargz's chunkDigest) checks them in `decompress_span` and raises IntegrityError there,
  as `verify_span` does for compressed bytes (eStargz: bytes that do not inflate are an
  IntegrityError too, so a corrupted byte is EIO after the fetcher's retries).

An index whose stream holds no tar headers says so with `headers_in_stream = False`
(zstd:chunked's and eStargz's, whose streams are their files' contents alone, and whose
TOCs are vouched for by the image manifest's annotations): the service then skips fs/header_check.py for it.
An index whose every span is a chunk of one file says so with `spans_within_files = True` (the
same two): read-ahead then goes on past a file's end into its neighbours (fs/span_fetcher.py).
An index may also offer `span_receiver(i)`, a `SpanReceiver` that takes span i's compressed
bytes in pieces as they arrive and whose `finish()` is `verify_span` then `decompress_span`
(a zTOC's inflates each piece as it comes): the span fetcher then streams a request's bytes
into it, and a span is decoded while the next ones are still on their way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol, runtime_checkable

__all__ = ["IndexEntry", "LayerIndex", "SpanReceiver"]


class IndexEntry(Protocol):
    """One entry of the layer as its index describes it (the tar header must agree)."""

    @property
    def name(self) -> str: ...          # as the tar spells it (surrogateescape for non-UTF-8 bytes)
    @property
    def type(self) -> str: ...
    @property
    def offset(self) -> int: ...        # where its data starts in the tar stream
    @property
    def size(self) -> int: ...
    @property
    def linkname(self) -> str: ...
    @property
    def mode(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...
    @property
    def devmajor(self) -> int: ...
    @property
    def devminor(self) -> int: ...
    @property
    def xattrs(self) -> Mapping[str, bytes]: ...   # PAX SCHILY.xattr.* records, prefix stripped


@runtime_checkable
class LayerIndex(Protocol):
    """The index of one layer's tar stream: its entries and its spans (see the module docstring)."""

    @property
    def digest(self) -> str: ...        # the index's own digest: a lazy view is keyed by it
    @property
    def uncompressed_size(self) -> int: ...
    @property
    def num_spans(self) -> int: ...
    @property
    def may_have_xattrs(self) -> bool: ...   # False only if no entry has one (a cheap, safe answer)

    def __len__(self) -> int:
        """The number of entries."""
        ...

    def entry(self, i: int) -> IndexEntry:
        """Entry i, decoded."""
        ...

    def entry_name(self, i: int) -> bytes:
        """Entry i's name as stored: every lookup reads names, so this must be cheap."""
        ...

    def entry_extent(self, i: int) -> tuple[int, int]:
        """Entry i's (offset, size), as `entry(i)` has them: cheap, for every file of a layer at once."""
        ...

    def tree_entries(self) -> Iterator[tuple[bytes, str, bytes]]:
        """(name, type, link target) of every entry in index order, the target only for
        hardlinks (b"" otherwise): what the directory tree is built from, cheaply."""
        ...

    def spans_for(self, start: int, end: int) -> range:
        """The spans holding uncompressed bytes [start, end) of the tar stream."""
        ...

    def span_uncompressed_range(self, i: int) -> tuple[int, int]:
        """Span i's [start, end) in the tar stream."""
        ...

    def span_compressed_range(self, i: int) -> tuple[int, int]:
        """Span i's [start, end) in the compressed layer blob: what is fetched for it."""
        ...

    def span_digest(self, i: int) -> str:
        """The digest span i's compressed bytes must have."""
        ...

    def verify_span(self, i: int, compressed: bytes) -> None:
        """IntegrityError unless `compressed` is exactly span i's bytes."""
        ...

    def decompress_span(self, i: int, compressed: bytes) -> bytes:
        """Span i's uncompressed bytes from its verified compressed bytes (FormatError if they
        do not decode: then the index itself is wrong; IntegrityError if the index's digest is
        of the decoded bytes and they do not match it)."""
        ...


class SpanReceiver(Protocol):
    """One span's compressed bytes, taken in pieces as they arrive (`span_receiver`)."""

    def feed(self, piece: bytes) -> None:
        """The next compressed bytes of the span, in order."""
        ...

    def finish(self) -> bytes:
        """The span's bytes: IntegrityError if what was fed is not exactly the span's bytes
        (also when it did not decode either), FormatError if it is and does not decode."""
        ...

    def close(self) -> None:
        """Drop what it holds without a result (a request that failed)."""
        ...
