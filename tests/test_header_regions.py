"""Header bytes kept in memory as spans are stored, on a real gzip layer, its real zTOC, span
manager, span cache and header checks: checks of stored spans read no disk, and what is kept is
always the layer's own bytes."""

from __future__ import annotations

import functools
import gzip
import os

import pytest

from helpers.images import Entry, make_layer
from helpers.lazy import ztoc_for
from lazyoci.fs import header_regions, span_cache
from lazyoci.fs.header_check import LayerVerifier
from lazyoci.fs.header_regions import HeaderRegions, cut
from lazyoci.fs.span_cache import SpanCache
from lazyoci.fs.span_fetcher import SpanFetcher, flush_cache_writes
from lazyoci.ztoc import Ztoc

SPAN = 64 << 10


@pytest.fixture(scope="module")
def layer():
    # long names (PAX records in front of the main header) and files of a few KiB
    entries = [Entry("pkg/", kind="dir"), *(
        Entry(f"pkg/{'long-module-name-' * 8}{i:03}.py", data=os.urandom(3 << 10)) for i in range(120)),
        Entry("pkg/link", kind="symlink", data=b"x" * 300)]
    layer = make_layer(entries, "gzip")
    return layer, Ztoc.parse(ztoc_for(layer, span_size=SPAN)), gzip.decompress(layer.blob)


@pytest.fixture
def stored(tmp_path, layer, monkeypatch):
    """Every span of the layer fetched, verified and stored, with a store of its own."""
    blob, ztoc, tar = layer[0].blob, layer[1], layer[2]
    monkeypatch.setattr(span_cache, "HEADER_REGIONS", HeaderRegions())
    spans = [ztoc.span_uncompressed_range(i) for i in range(ztoc.num_spans)]
    cache = SpanCache(tmp_path / "cache").layer(layer[0].digest, "sha256:" + "1" * 64, spans)
    fetcher = SpanFetcher(ztoc, lambda lo, hi: blob[lo:hi], cache, layer[0].digest)
    fetcher.ensure(range(ztoc.num_spans))
    flush_cache_writes()
    yield fetcher, cache
    cache.close()


def _regions(ztoc: Ztoc) -> list[tuple[int, int]]:
    """Every entry's header region [where the entry before it ends, its data offset)."""
    out, end = [], 0
    for offset, size in sorted(ztoc.entry_extent(i) for i in range(len(ztoc))):
        out.append((end, offset))
        end = offset + -(-size // 512) * 512
    return out


def test_checks_of_stored_spans_read_their_headers_from_memory(layer, stored, monkeypatch):
    ztoc, tar = layer[1], layer[2]
    fetcher, cache = stored
    reads: list[tuple[int, int]] = []
    real = os.pread
    monkeypatch.setattr(span_cache.os, "pread", lambda fd, n, off: reads.append((off, n)) or real(fd, n, off))
    assert ztoc.num_spans > 3 and span_cache.HEADER_REGIONS.kept_bytes > 0
    for start, end in _regions(ztoc):       # regions across span boundaries come piece by piece
        assert fetcher.read_cached(start, end, header=True) == tar[start:end]
    verifier = LayerVerifier(ztoc, functools.partial(fetcher.read, header=True),
                             functools.partial(fetcher.read_cached, header=True), "layer")
    assert verifier.check_cached(list(range(len(ztoc))))
    assert reads == [], "no header read went to the disk"
    assert fetcher.read_cached(100, 3000, header=True) == tar[100:3000]      # file data too
    assert reads, "bytes no piece holds come from the disk"


def test_kept_headers_go_with_their_layer_and_within_the_budget(layer, stored, monkeypatch):
    ztoc, tar = layer[1], layer[2]
    fetcher, cache = stored
    store = span_cache.HEADER_REGIONS
    start, end = _regions(ztoc)[-1]
    span = ztoc.spans_for(start, end)[-1]
    s0, _ = ztoc.span_uncompressed_range(span)
    start = max(start, s0)
    assert store.find(cache, span, start, end) == tar[start:end]
    store.budget = store.kept_bytes - 1          # the next span stored pushes the oldest out
    fetcher._keep_headers(span, tar[s0:ztoc.span_uncompressed_range(span)[1]])
    assert store.kept_bytes <= store.budget and store.find(cache, span, start, end) == tar[start:end]
    assert store.find(cache, 0, 0, 512) is None, "the oldest span's pieces went"
    assert cache.read_header_range(0, 0, 512) == tar[:512], "and its headers come from the disk"
    assert cache.evict(cache.total_bytes) > 0
    assert store.kept_bytes == 0 and cache.read_header_range(span, start, end) is None


def test_an_index_out_of_stream_order_keeps_only_the_spans_own_bytes_and_no_more_than_it(layer, monkeypatch):
    ztoc, tar = layer[1], layer[2]
    looked_at: list[int] = []
    extent = ztoc.entry_extent
    monkeypatch.setattr(ztoc, "entry_extent", lambda i: looked_at.append(i) or extent(i))
    for span in range(ztoc.num_spans):
        s0, s1 = ztoc.span_uncompressed_range(span)
        for entries in (range(len(ztoc) - 1, -1, -1), range(len(ztoc))):
            looked_at.clear()
            pieces = cut(ztoc, span, tar[s0:s1], entries)
            assert all(s0 <= lo and lo + len(b) <= s1 and b == tar[lo:lo + len(b)] for lo, b in pieces)
            assert sum(len(b) for _, b in pieces) <= (s1 - s0) + header_regions.REGION_KEPT
            assert len(looked_at) <= (s1 - s0) // 512 + 3, "no more entries than the span has blocks"
