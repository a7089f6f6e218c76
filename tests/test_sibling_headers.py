"""Header checks ahead of lookups, on a real gzip layer, its real zTOC, tree, header checks and
span manager: the fetch function serves byte ranges of the blob and records every request."""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import pytest

from helpers.images import Entry, make_layer
from helpers.lazy import wait_fetches_settle, ztoc_for
from lazyoci.fs.header_check import LayerVerifier
from lazyoci.fs.sibling_headers import SiblingHeaders, fetch_first_headers
from lazyoci.fs.span_cache import SpanCache
from lazyoci.fs.span_fetcher import SpanFetcher
from lazyoci.fs.tree import LayerTree
from lazyoci.ztoc import Ztoc

SPAN = 64 << 10


@pytest.fixture(scope="module")
def two_packages():
    # 2 KiB files of random bytes: a 64 KiB span holds the headers of about 25 of them
    entries = [e for pkg in ("a", "b") for e in [Entry(f"{pkg}/", kind="dir"), *(
        Entry(f"{pkg}/m{i:03}.py", data=os.urandom(2 << 10)) for i in range(200))]]
    layer = make_layer(entries, "gzip")
    return layer, Ztoc.parse(ztoc_for(layer, span_size=SPAN))


class Layer:
    """One layer as the lazy filesystem holds it, its fetches recorded by span."""

    def __init__(self, tmp_path: Path, layer, ztoc: Ztoc) -> None:
        self.ztoc, self.requests = ztoc, []
        self.tar = gzip.decompress(layer.blob)

        def fetch(start: int, end: int) -> bytes:
            self.requests.append((start, end))
            return layer.blob[start:end]

        spans = [ztoc.span_uncompressed_range(i) for i in range(ztoc.num_spans)]
        cache = SpanCache(tmp_path / "cache").layer(layer.digest, "sha256:" + "1" * 64, spans)
        self.fetcher = SpanFetcher(ztoc, fetch, cache, layer.digest)
        self.tree = LayerTree(ztoc)
        self.verifier = LayerVerifier(ztoc, functools.partial(self.fetcher.read, header=True),
                                      functools.partial(self.fetcher.read_cached, header=True), layer.digest)

    def node(self, path: str) -> int:
        n = 0
        for part in path.split("/"):
            n = self.tree.lookup(n, part.encode())
        return n

    def look_up(self, path: str, sibling_headers: SiblingHeaders) -> int:
        """Check a node as a lookup does; tell `sibling_headers` if the check had to fetch.
        Returns how many spans it queued."""
        n = self.node(path)
        todo = self.verifier.unchecked(self.tree.entries_behind(n))
        if not todo or self.verifier.check_cached(todo):
            return 0
        self.verifier.check(todo)
        return sibling_headers.missed(self.tree, self.verifier, self.fetcher, n)

    def fetches(self) -> list[int]:
        """The spans whose whole compressed range a request asked for, once per request."""
        z = self.ztoc
        return [i for lo, hi in self.requests for i in range(z.num_spans)
                if lo <= z.span_compressed_range(i)[0] and z.span_compressed_range(i)[1] <= hi]

    def fetched_spans(self) -> set[int]:
        return set(self.fetches())

    def behind_spans(self, path: str) -> set[int]:
        """The spans of the headers a lookup of `path` checks: its own and its directories', and
        those of the entries before them (whose ends are where their header regions start)."""
        z = self.ztoc
        return {s for i in self.tree.entries_behind(self.node(path)) for j in (i - 1, i) if j >= 0
                for s in z.spans_for(z.entry(j).offset - 512, z.entry(j).offset)}

    def header_spans(self, prefix: str) -> set[int]:
        z = self.ztoc
        return {s for i in range(len(z)) if z.entry(i).name.startswith(prefix)
                for s in z.spans_for(z.entry(i).offset - 512, z.entry(i).offset)}

    def wait_idle(self) -> None:
        wait_fetches_settle(self.requests)


def test_in_a_scan_a_check_that_fetches_fetches_its_siblings_headers_ahead_once(tmp_path, two_packages):
    lay = Layer(tmp_path, *two_packages)
    sh = SiblingHeaders(scan_misses=3)
    # the first misses (a small start's own path) fetch only their own spans
    assert lay.look_up("a/m000.py", sh) == 0
    assert lay.look_up("b/m199.py", sh) == 0
    lay.wait_idle()
    before = lay.fetched_spans()
    assert before == lay.behind_spans("a/m000.py") | lay.behind_spans("b/m199.py")
    # the third different span: a scan, so a/'s other headers come ahead of their lookups
    queued = lay.look_up("a/m100.py", sh)
    lay.wait_idle()
    a_spans = lay.header_spans("a/")
    assert queued == len(a_spans - before - lay.header_spans("a/m100")) >= 4
    assert lay.fetched_spans() == before | a_spans, "a/'s header spans, each once, nothing of b/"
    assert len(lay.fetches()) == len(lay.fetched_spans()), "no span fetched twice"
    # every other lookup in a/ is served by the cache: no request, its header checked all the same
    n_requests = len(lay.requests)
    for i in range(0, 200, 7):
        assert lay.look_up(f"a/m{i:03}.py", sh) == 0
    assert len(lay.requests) == n_requests
    # another directory's miss fetches its own siblings' headers; a directory goes ahead once
    assert lay.look_up("b/m100.py", sh) > 0
    lay.wait_idle()
    assert lay.header_spans("b/") <= lay.fetched_spans()
    assert len(lay.fetches()) == len(lay.fetched_spans()), "no span fetched twice"
    lay.verifier.state[:] = bytes(len(lay.verifier.state))      # as if every check were to come
    assert sh.missed(lay.tree, lay.verifier, lay.fetcher, lay.node("a/m150.py")) == 0


def test_misses_long_ago_are_no_scan(tmp_path, two_packages):
    lay = Layer(tmp_path, *two_packages)
    now = [0.0]
    sh = SiblingHeaders(scan_misses=3, window=10.0, clock=lambda: now[0])
    assert lay.look_up("a/m000.py", sh) == 0
    assert lay.look_up("a/m199.py", sh) == 0
    now[0] = 11.0                                     # those two are past the window
    assert lay.look_up("b/m100.py", sh) == 0
    assert lay.look_up("b/m180.py", sh) == 0
    lay.wait_idle()
    assert len(lay.requests) == 4, "two misses in the window: no scan, nothing fetched ahead"


def test_a_span_many_lookups_waited_for_counts_once(tmp_path, two_packages):
    lay = Layer(tmp_path, *two_packages)
    sh = SiblingHeaders(scan_misses=2)
    # m000 and m001 have their headers in one span: one miss, no scan
    assert lay.ztoc.spans_for(*_header(lay, "a/m000.py")) == lay.ztoc.spans_for(*_header(lay, "a/m001.py"))
    assert sh.missed(lay.tree, lay.verifier, lay.fetcher, lay.node("a/m000.py")) == 0
    assert sh.missed(lay.tree, lay.verifier, lay.fetcher, lay.node("a/m001.py")) == 0
    # a second span: a scan (nothing was checked here, so every other header of a/ is wanted)
    assert sh.missed(lay.tree, lay.verifier, lay.fetcher, lay.node("a/m150.py")) > 0
    lay.wait_idle()


def _header(lay: Layer, path: str) -> tuple[int, int]:
    offset = lay.ztoc.entry(lay.tree.entry[lay.node(path)]).offset
    return offset - 1, offset


def test_among_large_files_no_header_is_fetched_ahead(tmp_path):
    # each header of a directory of large files shares its span with file data: left to its lookup
    entries = [Entry(f"models/w{i}.bin", data=os.urandom(300 << 10)) for i in range(8)]
    layer = make_layer(entries, "gzip")
    lay = Layer(tmp_path, layer, Ztoc.parse(ztoc_for(layer, span_size=SPAN)))
    sh = SiblingHeaders(scan_misses=1)
    assert lay.look_up("models/w3.bin", sh) == 0
    lay.wait_idle()
    assert lay.fetched_spans() == lay.behind_spans("models/w3.bin")


def test_forgetting_a_layer_lets_its_directories_be_fetched_ahead_again(tmp_path, two_packages):
    lay = Layer(tmp_path, *two_packages)
    sh = SiblingHeaders(scan_misses=1)
    assert lay.look_up("a/m100.py", sh) > 0
    lay.wait_idle()
    lay2 = Layer(tmp_path / "again", *two_packages)      # mounted again, an empty cache
    assert lay2.look_up("a/m050.py", sh) == 0, "a/ of this index went ahead already"
    sh.forget(lay.ztoc.digest)
    assert lay2.look_up("a/m150.py", sh) > 0
    lay2.wait_idle()


def test_what_is_fetched_ahead_is_bounded_in_bytes(tmp_path, two_packages):
    lay = Layer(tmp_path, *two_packages)
    z = lay.ztoc
    size = [z.span_compressed_range(i)[1] - z.span_compressed_range(i)[0] for i in range(4)]
    assert lay.fetcher.fetch_ahead([3, 2, 1, 0], most_bytes=size[3] + size[2] + size[1] // 2) == 2
    lay.wait_idle()
    assert lay.fetched_spans() == {2, 3}, "the first spans in the caller's order, as far as the bytes go"


def test_at_mount_the_first_span_comes_ahead_in_a_layer_of_many_entries_only(tmp_path, two_packages):
    lay = Layer(tmp_path, *two_packages)
    assert fetch_first_headers(lay.fetcher) == 1
    lay.wait_idle()
    assert lay.fetched_spans() == {0}
    n = len(lay.requests)
    assert lay.look_up("a/m000.py", SiblingHeaders()) == 0 and len(lay.requests) == n, \
        "the first lookup's headers are local"
    entries = [Entry(f"data/part{i}.bin", data=os.urandom(300 << 10)) for i in range(4)]
    layer = make_layer(entries, "gzip")
    data = Layer(tmp_path / "data", layer, Ztoc.parse(ztoc_for(layer, span_size=SPAN)))
    assert fetch_first_headers(data.fetcher) == 0
    data.wait_idle()
    assert not data.requests, "a layer of a few large files is left to its reads"


def test_a_directory_whose_check_fetches_has_its_own_entries_fetched_ahead(tmp_path, two_packages):
    # a directory is looked up to look inside it: its entries' headers come ahead too
    lay = Layer(tmp_path, *two_packages)
    sh = SiblingHeaders(scan_misses=1, ahead_per_miss=64)
    assert lay.look_up("b", sh) > 0
    lay.wait_idle()
    assert lay.header_spans("b/") <= lay.fetched_spans()
    assert not lay.header_spans("a/m05") & lay.fetched_spans(), "the siblings' contents are not"
    assert len(lay.fetches()) == len(lay.fetched_spans()), "no span fetched twice"


def test_on_a_recorded_path_only_the_recorded_spans_come_ahead(tmp_path, two_packages):
    # a view with a recorded prefetch whose workload got ahead of it: siblings' headers in spans
    # the recording does not name were never looked up in the recorded run
    lay = Layer(tmp_path, *two_packages)
    a_spans = sorted(lay.header_spans("a/"))
    own = lay.behind_spans("a/m000.py") | lay.behind_spans("b/m199.py") | lay.behind_spans("a/m100.py")
    recorded = set(a_spans[::2]) | own
    lay.fetcher.recorded = frozenset(recorded)
    sh = SiblingHeaders(scan_misses=3)
    for path in ("a/m000.py", "b/m199.py", "a/m100.py"):
        lay.look_up(path, sh)
    lay.wait_idle()
    assert lay.fetched_spans() == (own | set(a_spans)) & recorded
    assert set(a_spans) - recorded, "some of a/'s header spans were left out"


def test_a_directory_of_packages_brings_no_more_than_the_scan_has_fetched(tmp_path):
    # node_modules-like: a workload wants a few packages of many, so guessing all their headers
    # would bring most of the layer for a handful of lookups
    entries = [e for p in range(80) for e in [Entry(f"nm/p{p:02}/", kind="dir"), *(
        Entry(f"nm/p{p:02}/f{i}.js", data=os.urandom(2 << 10)) for i in range(10))]]
    layer = make_layer(entries, "gzip")
    ztoc = Ztoc.parse(ztoc_for(layer, span_size=SPAN))
    lay = Layer(tmp_path, layer, ztoc)
    sh = SiblingHeaders(scan_misses=2)
    assert lay.look_up("nm/p00", sh) == 0
    queued = lay.look_up("nm/p40", sh)     # a scan: 2 spans missed, so at most 4 come ahead
    lay.wait_idle()
    own = lay.behind_spans("nm/p00") | lay.behind_spans("nm/p40")
    assert queued == 4
    ahead = lay.fetched_spans() - own
    assert len(ahead) == 4 and len(lay.header_spans("nm/p")) > 20
    near = max(lay.behind_spans("nm/p40"))
    assert ahead == set(range(near + 1, near + 5)), "the spans right after the miss, onwards first"
    # the same scan with the bound lifted brings most of the layer
    wide = Layer(tmp_path / "wide", layer, ztoc)
    sh = SiblingHeaders(scan_misses=2, ahead_per_miss=1000)
    wide.look_up("nm/p00", sh)
    assert wide.look_up("nm/p40", sh) > 20
    wide.wait_idle()
