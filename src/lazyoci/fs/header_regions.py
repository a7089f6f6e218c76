"""Tar header bytes of the spans the fetcher stores, kept in memory for the header checks.

A lookup's header check (fs/header_check.py) reads the bytes in front of an entry's data: its tar
headers. Once a span is on disk its pages leave the page cache (fs/span_cache.py, Memory), so
those reads went to the disk, a chunk at a time: in python-ml's optimized start about 1,300 reads
of 0.14 ms each, most of them inside LOOKUPs the workload waited for. Headers are a small part of
a span (that start writes about 10 MB of them with 250 MB of spans), so when the fetcher stores a
verified span it cuts out the bytes in front of each entry's data (`cut`), and they are kept here,
HEADER_BYTES_KEPT of all layers, the oldest span's going first. Header reads of the span cache
(`LayerCache.read_header_range`) look here first.

What is kept is bytes of a verified span at their own offsets, whatever the index says of its
entries: an index that lies about them only makes pieces no check asks for (at most the span's
own size of them), and a read that no one piece holds goes to the disk as before.
"""

from __future__ import annotations

import threading
from array import array
from bisect import bisect_right
from typing import Hashable

from lazyoci.fs.layer_index import LayerIndex

BLOCK = 512
HEADER_BYTES_KEPT = 32 << 20     # of all layers (the module docstring)
REGION_KEPT = 16 << 10           # bytes in front of one entry's data kept at most (PAX, long names)

Pieces = list[tuple[int, bytes]]


def cut(index: LayerIndex, span: int, data: bytes, entries: range) -> Pieces:
    """The header regions in span `span` (its bytes `data`): for each of `entries` (those whose data
    starts in the span, then the next, whose headers may begin in it), the bytes from where the
    entry before it ends, as the index says, up to its data, within the span; sorted. At most as
    many entries as the span has blocks, and the next, are looked at: each entry's data follows a
    header block of its own, so an index out of stream order, whose `entries` may be most of
    them, costs no more per span than one in order."""
    s0, s1 = index.span_uncompressed_range(span)
    pieces: Pieces = []
    kept = 0
    end = 0                      # where the entry before ends (rounded up to a block)
    if entries.start > 0:
        offset, size = index.entry_extent(entries.start - 1)
        end = offset + -(-size // BLOCK) * BLOCK
    for j in entries[:(s1 - s0) // BLOCK + 2]:
        offset, size = index.entry_extent(j)
        lo, hi = max(end, s0, offset - REGION_KEPT), min(offset, s1)
        if lo < hi:
            pieces.append((lo, data[lo - s0:hi - s0]))
            kept += hi - lo
            if kept > s1 - s0:   # pieces overlap: the index is not in stream order
                break
        end = offset + -(-size // BLOCK) * BLOCK
    pieces.sort(key=lambda piece: piece[0])
    return pieces


class HeaderRegions:
    """The pieces `cut` made of the spans stored last, by (layer cache, span); thread-safe."""

    def __init__(self, budget: int = HEADER_BYTES_KEPT) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._spans: dict[tuple[Hashable, int], tuple[array, list[bytes], int]] = {}
        self._bytes = 0

    def keep(self, layer: Hashable, span: int, pieces: Pieces) -> None:
        if not pieces:
            return
        starts = array("q", (start for start, _ in pieces))
        blobs = [blob for _, blob in pieces]
        size = sum(map(len, blobs))
        with self._lock:
            old = self._spans.pop((layer, span), None)
            if old is not None:
                self._bytes -= old[2]
            self._spans[(layer, span)] = (starts, blobs, size)
            self._bytes += size
            while self._bytes > self.budget:
                self._bytes -= self._spans.pop(next(iter(self._spans)))[2]      # the oldest

    def find(self, layer: Hashable, span: int, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of the span if one piece holds them all, else None."""
        with self._lock:
            kept = self._spans.get((layer, span))
        if kept is None:
            return None
        starts, blobs, _ = kept
        k = bisect_right(starts, start) - 1
        if k < 0 or end - starts[k] > len(blobs[k]):
            return None
        return blobs[k][start - starts[k]:end - starts[k]]

    def forget(self, layer: Hashable) -> None:
        """Drop the pieces of a layer that lost spans or closed."""
        with self._lock:
            for key in [key for key in self._spans if key[0] is layer]:
                self._bytes -= self._spans.pop(key)[2]

    @property
    def kept_bytes(self) -> int:
        return self._bytes


HEADER_REGIONS = HeaderRegions()
