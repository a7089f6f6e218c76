"""Where a gzip layer's spans end: at the span size among small files, farther apart inside large ones.

A span is what a read pays for, and each span costs the zTOC a 32 KiB inflate window, which
every lazy pull fetches whole for every layer, read or not. Among small files a short span
keeps a read of one file from fetching its neighbours; inside a file of at least
`large_span_size` bytes the neighbours are the same file, which the read path reads ahead
anyway, so spans there run up to `large_span_size` and the layer's zTOC shrinks (a 200 MiB
layer of big files: 13 windows instead of 50 at 4 MiB spans). A span still ends at the first
block end after a large file's data, so a small file that follows one starts a short span.

Readers find spans by their checkpoints, never by multiplying the span size (the reference's
too), so spans of different lengths in one layer read as any other zTOC. Uncompressed layers
keep fixed spans: their span table is the span size times the span number.
"""

from __future__ import annotations

from collections.abc import Callable

from lazyoci.tar.headers import HeaderFeed

__all__ = ["large_file_span_end"]


def large_file_span_end(toc: HeaderFeed, span_size: int, large_span_size: int) -> Callable[[int], int]:
    """The `span_end` of zinfo.GzipIndexer for a layer whose tar stream `toc` is parsing: a span
    that starts at `start` ends past start + span_size, or, while the stream is inside the data of
    a file of at least `large_span_size` bytes, past that file's data end or start +
    large_span_size, whichever comes first."""
    def span_end(start: int) -> int:
        end = start + span_size
        entries = toc.entries
        if not entries:
            return end
        last = entries[-1]
        length = last.data_length          # none for header-only types, whatever their size says
        data_end = last.offset + length
        if length >= large_span_size and last.offset <= toc.pos < data_end:
            return min(max(end, data_end), start + large_span_size)
        return end
    return span_end
