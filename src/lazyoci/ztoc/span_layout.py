"""Where a gzip layer's spans end: at the span size, but farther apart inside large files.

A span is what a read pays for, and each span costs the zTOC a 32 KiB inflate window, which
every lazy pull fetches whole for every layer, read or not. Among small files a short span
keeps a read of one file from fetching its neighbours. A span that starts inside the data of a
file of at least `large_span_size` bytes runs on inside that file for up to `large_span_size`
bytes (a read there reads ahead inside the file anyway), so the zTOC of a layer of big files
shrinks (a 200 MiB layer of four files: 14 windows instead of 50 at 4 MiB spans). It stops
`span_size` short of the file's end: the file's last bytes and the tar headers after them (which
a lookup of the next file checks) fall in a span of the ordinary size, as does every span that
starts anywhere else; a small file next to a large one never shares a large span with it.

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
    that starts at `start` ends past start + span_size or, when `start` lies inside the data of a
    file of at least `large_span_size` bytes, past start + large_span_size or span_size before the
    file's data end, whichever comes first (never before start + span_size). Only the entry read
    last can hold `start` inside its data: the stream leaves it only after such a span's end."""
    def span_end(start: int) -> int:
        end = start + span_size
        entries = toc.entries
        if not entries:
            return end
        last = entries[-1]
        length = last.data_length          # none for header-only types, whatever their size says
        data_end = last.offset + length
        if length >= large_span_size and last.offset <= start < data_end:
            return max(end, min(start + large_span_size, data_end - span_size))
        return end
    return span_end
