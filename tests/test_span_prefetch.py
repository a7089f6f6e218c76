"""The recorded prefetch of several layers at once: one bound on the requests in flight for all of
them, a request of each layer in turn, every listed span fetched once and verified. On a real gzip
layer and its real zTOC, mounted as two views (fetches recorded as in test_lazy_readahead)."""

from __future__ import annotations

import gzip
import threading
import time

from lazyoci.fs.span_prefetch import PrefetchScheduler, SpanPrefetch
from test_lazy_readahead import Ranges, _fetcher, _wait_idle, layer  # noqa: F401 - the fixture


class SlowRanges(Ranges):
    """Ranges that take a while, counting how many are in flight at once and in what order they came."""

    def __init__(self, blob, ztoc, name: str, seen: list[str], gauge: dict) -> None:
        super().__init__(blob, ztoc)
        self.name, self.seen, self.gauge = name, seen, gauge

    def __call__(self, start: int, end: int) -> bytes:
        with self.gauge["lock"]:
            self.seen.append(self.name)
            self.gauge["now"] += 1
            self.gauge["most"] = max(self.gauge["most"], self.gauge["now"])
        time.sleep(0.05)
        try:
            return super().__call__(start, end)
        finally:
            with self.gauge["lock"]:
                self.gauge["now"] -= 1


def test_the_prefetches_of_several_layers_share_one_bound_and_take_turns(tmp_path, layer):
    lay, ztoc = layer
    tar = gzip.decompress(lay.blob)
    seen: list[str] = []
    gauge = {"lock": threading.Lock(), "now": 0, "most": 0}
    scheduler = PrefetchScheduler(workers=2)
    listed = list(range(ztoc.num_spans - 1, -1, -2))      # every other span, last first: one request each
    prefetches, fetches = [], []
    for name in ("a", "b"):
        fetch = SlowRanges(lay.blob, ztoc, name, seen, gauge)
        f = _fetcher(tmp_path / name, lay, ztoc, fetch)
        p = SpanPrefetch(f, listed, scheduler=scheduler)
        p.start()
        prefetches.append(p)
        fetches.append((f, fetch))
    deadline = time.monotonic() + 60
    while not all(p.progress().finished for p in prefetches):
        assert time.monotonic() < deadline, [p.progress() for p in prefetches]
        time.sleep(0.05)
    assert gauge["most"] <= 2, "never more requests in flight than the one bound for every layer"
    assert "b" in seen[:len(listed)], f"the second layer waited for the whole first one: {seen}"
    for p, (f, fetch) in zip(prefetches, fetches):
        _wait_idle(f, fetch)
        assert p.progress().done == len(listed) and p.progress().failed == 0
        assert sorted(fetch.spans()) == sorted(listed), "each listed span once, nothing else"
        for i in listed:
            s0, s1 = ztoc.span_uncompressed_range(i)
            assert f.cache.has(i) and f.read_cached(s0, s1) == tar[s0:s1]


def test_adjacent_listed_spans_go_in_one_request_in_the_listed_order(tmp_path, layer):
    lay, ztoc = layer
    fetch = Ranges(lay.blob, ztoc)
    f = _fetcher(tmp_path, lay, ztoc, fetch)
    p = SpanPrefetch(f, [5, 6, 7, 0, 1, 9], run=2, scheduler=PrefetchScheduler(workers=1))
    p.start()
    deadline = time.monotonic() + 60
    while not p.progress().finished:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _wait_idle(f, fetch)
    runs = [[i for i in range(ztoc.num_spans) if s <= ztoc.span_compressed_range(i)[0] < e]
            for s, e in fetch.requests]
    assert runs == [[5, 6], [7], [0, 1], [9]]


class ManyRanges(Ranges):
    """Ranges that also serves several ranges in one request (as a registry answers
    multipart/byteranges), every such request recorded; `refuse`: answers None, as for a registry
    that serves one range per request; `corrupt_many`: spans corrupted in those answers only."""

    def __init__(self, blob, ztoc, refuse: bool = False, corrupt_many: set[int] = frozenset()) -> None:
        super().__init__(blob, ztoc)
        self.refuse, self.corrupt_many = refuse, corrupt_many
        self.batches: list[list[tuple[int, int]]] = []

    def many(self, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        with self.lock:
            self.batches.append(list(ranges))
        if self.refuse:
            return None
        out = []
        for start, end in ranges:
            data = bytearray(self.blob[start:end])
            for i in self.corrupt_many:
                c0 = self.ztoc.span_compressed_range(i)[0]
                if start <= c0 < end:
                    data[c0 - start] ^= 0xFF
            out.append(bytes(data))
        return out


def _many_fetcher(tmp_path, lay, ztoc, fetch: ManyRanges):
    f = _fetcher(tmp_path, lay, ztoc, fetch)
    f.fetch_ranges = fetch.many
    return f


def _prefetch_all(f, listed: list[int], request_bytes: int) -> SpanPrefetch:
    p = SpanPrefetch(f, listed, scheduler=PrefetchScheduler(workers=1), request_bytes=request_bytes)
    p.start()
    deadline = time.monotonic() + 60
    while not p.progress().finished:
        assert time.monotonic() < deadline, p.progress()
        time.sleep(0.05)
    return p


def _spans_of(ztoc, ranges: list[tuple[int, int]]) -> list[int]:
    """The spans whose whole compressed range one of `ranges` holds, once per range."""
    return [i for lo, hi in ranges for i in range(ztoc.num_spans)
            if lo <= ztoc.span_compressed_range(i)[0] and ztoc.span_compressed_range(i)[1] <= hi]


def test_listed_spans_go_several_ranges_to_a_request_where_the_registry_serves_that(tmp_path, layer):
    """Every other span listed, so no two adjacent: one request per span before; now the next
    spans of the list up to the request's bytes go in one request, each verified and cached."""
    lay, ztoc = layer
    tar = gzip.decompress(lay.blob)
    fetch = ManyRanges(lay.blob, ztoc)
    f = _many_fetcher(tmp_path, lay, ztoc, fetch)
    listed = list(range(ztoc.num_spans - 1, -1, -2))
    budget = 4 * (ztoc.span_compressed_range(1)[1] - ztoc.span_compressed_range(1)[0])
    p = _prefetch_all(f, listed, request_bytes=budget)
    _wait_idle(f, fetch)
    # a request left with one span (the list's last, as the spans' sizes fall) asks for one range
    assert len(fetch.requests) <= 1 and len(_spans_of(ztoc, fetch.requests)) == len(fetch.requests)
    requests = len(fetch.batches) + len(fetch.requests)
    assert 1 < requests <= len(listed) // 3 + 1, (fetch.batches, fetch.requests)
    assert sorted([s for b in fetch.batches for s in _spans_of(ztoc, b)] + _spans_of(ztoc, fetch.requests)) == \
        sorted(listed), "each listed span once, nothing else"
    assert all(len(b) == len(_spans_of(ztoc, b)) for b in fetch.batches), "a range per span: none adjacent"
    first = _spans_of(ztoc, fetch.batches[0])
    assert first == sorted(listed[:len(first)]), "the list's first spans come first"
    assert p.progress().done == len(listed) and f.multi_range
    assert f.stats.requests == requests
    for i in listed:
        s0, s1 = ztoc.span_uncompressed_range(i)
        assert f.read_cached(s0, s1) == tar[s0:s1]


def test_a_registry_refusing_several_ranges_is_asked_one_run_per_request(tmp_path, layer):
    lay, ztoc = layer
    tar = gzip.decompress(lay.blob)
    fetch = ManyRanges(lay.blob, ztoc, refuse=True)
    f = _many_fetcher(tmp_path, lay, ztoc, fetch)
    listed = [9, 1, 5, 6, 3]
    p = _prefetch_all(f, listed, request_bytes=64 << 20)
    _wait_idle(f, fetch)
    assert len(fetch.batches) == 1, "asked once, then never again"
    assert not f.multi_range
    assert sorted(_spans_of(ztoc, fetch.requests)) == sorted(listed)
    assert len(fetch.requests) == 4, "5 and 6 in one range"
    assert p.progress().done == len(listed)
    for i in listed:
        s0, s1 = ztoc.span_uncompressed_range(i)
        assert f.read_cached(s0, s1) == tar[s0:s1]


def test_a_span_failing_its_digest_in_a_request_of_several_ranges_is_fetched_again_alone(tmp_path, layer):
    lay, ztoc = layer
    tar = gzip.decompress(lay.blob)
    fetch = ManyRanges(lay.blob, ztoc, corrupt_many={4})
    f = _many_fetcher(tmp_path, lay, ztoc, fetch)
    got = f.ensure([0, 4, 8])
    assert len(fetch.batches) == 1 and _spans_of(ztoc, fetch.batches[0]) == [0, 4, 8]
    assert _spans_of(ztoc, fetch.requests) == [4], "the bad span alone, in a request of its own"
    for i in (0, 4, 8):
        s0, s1 = ztoc.span_uncompressed_range(i)
        assert got[i] == tar[s0:s1]
