"""Where a gzip layer's spans end: at the span size, but farther apart in a layer of big files.

A span is what a read pays for, and each span costs the zTOC a 32 KiB inflate window, which
every lazy pull fetches whole for every layer, read or not. Among small files a short span
keeps a read of one file from fetching its neighbours. In a layer of few big files (nearly all
of the layer up to that point, LARGE_SHARE of its bytes, is data of files of at least
`large_span_size` bytes) a span that starts inside such a file runs on inside it for up to
`large_span_size` bytes, so the zTOC shrinks (a 200 MiB layer of four files: 18 windows
instead of 50 at 4 MiB spans). It stops `span_size` short of the file's end: the file's last
bytes and the tar headers after them (which a lookup of the next file checks) fall in a span
of the ordinary size, as does every other span.

Layers of many files keep ordinary spans even inside their big files: there a big file is
typically a shared library paged in at scattered offsets (python-ml's libtorch), where a long
span costs every such read more than the windows it saves (bench/README.md, "Spans inside
large files"). The share is of the layer read so far, so the choice is made in the one pass
that builds the zTOC.

A recorded run (`lazyoci soci optimize`) knows better still which bytes a workload reads:
`recorded_span_end` lays the spans out around them. A 4 MiB span that a read touches is inflated
and cached whole, and a start that pages a large library in at scattered offsets touches most
of them for a few pages each (python-ml: 306 MiB of spans inflated for 133 MiB of pages read in
its largest layer's 862 MiB). There a span covers a run of recorded reads (runs closer than
RECORDED_GAP joined, widened by RECORDED_MARGIN for the deflate block that ends a span past its
mark), at most `span_size` long, and the stretches no read touched are spans of up to
`unread_span_size`, which the recorded prefetch never fetches.

Readers find spans by their checkpoints, never by multiplying the span size (the reference's
too), so spans of different lengths in one layer read as any other zTOC. Uncompressed layers
keep fixed spans: their span table is the span size times the span number.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable

from lazyoci.tar.headers import HeaderFeed

__all__ = ["LARGE_SHARE", "RECORDED_GAP", "RECORDED_MARGIN", "large_file_span_end", "recorded_span_end"]

LARGE_SHARE = 0.9     # of the layer's bytes before a span, in large files' data: a layer of big files
RECORDED_GAP = 256 << 10      # recorded reads closer than this share a span
RECORDED_MARGIN = 64 << 10    # room around them for the deflate block that ends a span past its mark


def large_file_span_end(toc: HeaderFeed, span_size: int, large_span_size: int) -> Callable[[int], int]:
    """The `span_end` of zinfo.GzipIndexer for a layer whose tar stream `toc` is parsing: a span
    that starts at `start` ends past start + span_size or, when `start` lies inside the data of a
    file of at least `large_span_size` bytes and LARGE_SHARE of the stream before `start` is such
    data, past start + large_span_size or span_size before the file's data end, whichever comes
    first (never before start + span_size).

    All it looks at lies before `start` (entries whose data starts there were read before the
    output reached it), so the answer for a span never changes while the span is inflated."""
    starts: list[int] = []         # data start of each large file seen, in stream order
    before: list[int] = [0]        # large-file data bytes before each of them
    lengths: list[int] = []
    seen = 0

    def large_bytes_before(start: int) -> int:
        k = bisect_right(starts, start)        # large files whose data starts at or before `start`
        if not k:
            return 0
        return before[k - 1] + min(start - starts[k - 1], lengths[k - 1])

    def span_end(start: int) -> int:
        nonlocal seen
        end = start + span_size
        entries = toc.entries
        for e in entries[seen:]:
            if e.data_length >= large_span_size:
                starts.append(e.offset)
                lengths.append(e.data_length)
                before.append(before[-1] + e.data_length)
        seen = len(entries)
        if not entries or start <= 0:
            return end
        last = entries[-1]
        length = last.data_length          # none for header-only types, whatever their size says
        data_end = last.offset + length
        if length >= large_span_size and last.offset <= start < data_end and \
                large_bytes_before(start) >= LARGE_SHARE * start:
            return max(end, min(start + large_span_size, data_end - span_size))
        return end
    return span_end


def recorded_span_end(reads: Iterable[tuple[int, int]], span_size: int,
                      unread_span_size: int) -> Callable[[int], int]:
    """The `span_end` of zinfo.GzipIndexer for spans laid out around recorded reads (uncompressed
    [start, end) ranges of the layer's tar stream, in any order): a span that starts in a run of
    reads ends past its end or span_size on, whichever comes first; one that starts where no read
    is ends past RECORDED_MARGIN before the next run or unread_span_size on. It looks only at the
    reads, so the answer for a span never changes while the span is inflated."""
    runs: list[list[int]] = []
    for start, end in sorted((max(0, s - RECORDED_MARGIN), e + RECORDED_MARGIN) for s, e in reads if e > s):
        if runs and start <= runs[-1][1] + RECORDED_GAP:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    # a span starting within a margin of the next run belongs to that run
    starts = [start - RECORDED_MARGIN for start, _ in runs]

    def span_end(start: int) -> int:
        k = bisect_right(starts, start) - 1
        if k >= 0 and start < runs[k][1]:
            return max(start + 1, min(runs[k][1], start + span_size))
        end = start + unread_span_size
        if k + 1 < len(runs):
            end = min(end, starts[k + 1])
        return max(start + 1, end)
    return span_end
