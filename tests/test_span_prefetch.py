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
