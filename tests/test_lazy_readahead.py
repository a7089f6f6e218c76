"""Read-ahead and write-behind of the span manager, on a real gzip layer and its real zTOC.

The fetch function serves byte ranges of the real blob (what the registry would send) and
records every request, so the tests see exactly which spans went over the "network".
"""

from __future__ import annotations

import gzip
import os
import threading
from pathlib import Path

import pytest

from helpers.images import Entry, make_layer
from helpers.lazy import wait_fetches_settle, ztoc_for
from lazyoci.errors import IntegrityError
from lazyoci.fs.span_cache import SpanCache
from lazyoci.fs import span_fetcher
from lazyoci.fs.span_fetcher import HEADER_READ_AHEAD, READ_AHEAD_FIRST, READ_AHEAD_SPANS, SpanFetcher
from lazyoci.ztoc import Ztoc

SPAN = 64 << 10


@pytest.fixture(scope="module")
def layer():
    # incompressible data: every span is about SPAN compressed bytes
    entries = [Entry(f"f{i}.bin", data=os.urandom(300 << 10)) for i in range(6)]
    layer = make_layer(entries, "gzip")
    ztoc = Ztoc.parse(ztoc_for(layer, span_size=SPAN))
    assert ztoc.num_spans >= 20
    return layer, ztoc


class Ranges:
    """The blob's bytes by range, every request recorded (optionally corrupting some spans)."""

    def __init__(self, blob: bytes, ztoc: Ztoc, corrupt: set[int] = frozenset()) -> None:
        self.blob, self.ztoc, self.corrupt = blob, ztoc, corrupt
        self.requests: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, start: int, end: int) -> bytes:
        with self.lock:
            self.requests.append((start, end))
        data = bytearray(self.blob[start:end])
        for i in self.corrupt:
            c0, c1 = self.ztoc.span_compressed_range(i)
            if start <= c0 < end:
                data[c0 - start] ^= 0xFF
        return bytes(data)

    def spans(self) -> list[int]:
        out = []
        for start, end in self.requests:
            out += [i for i in range(self.ztoc.num_spans)
                    if start <= self.ztoc.span_compressed_range(i)[0] < end]
        return out


def _whole_spans(fetch: Ranges, ztoc: Ztoc) -> list[int]:
    """The spans whose whole compressed range a request asked for, once per request (adjacent
    gzip spans share a byte, which Ranges.spans counts for both)."""
    return [i for lo, hi in fetch.requests for i in range(ztoc.num_spans)
            if lo <= ztoc.span_compressed_range(i)[0] and ztoc.span_compressed_range(i)[1] <= hi]


def _fetcher(tmp_path: Path, layer, ztoc: Ztoc, fetch: Ranges) -> SpanFetcher:
    spans = [ztoc.span_uncompressed_range(i) for i in range(ztoc.num_spans)]
    cache = SpanCache(tmp_path / "cache").layer(layer.digest, "sha256:" + "1" * 64, spans)
    return SpanFetcher(ztoc, fetch, cache, layer.digest)


def _wait_idle(fetcher: SpanFetcher, fetch: Ranges) -> None:
    """Until read-ahead requests stop coming and the writer has stored everything."""
    wait_fetches_settle(fetch.requests)


def test_a_miss_reads_ahead_a_sequential_reader_keeps_going_and_no_span_is_fetched_twice(tmp_path, layer):
    lay, ztoc = layer
    tar = gzip.decompress(lay.blob)
    fetch = Ranges(lay.blob, ztoc)
    f = _fetcher(tmp_path, lay, ztoc, fetch)
    assert f.read(10, 4096 + 10) == tar[10:4106]
    _wait_idle(f, fetch)
    first = sorted(fetch.spans())
    assert first[0] == 0 and len(first) > 1, "a miss fetches the spans after it too"
    assert all(f.cache.has(i) for i in first), "fetched spans are stored by the writer"
    # read on sequentially: the window moves on, every byte is right, nothing fetched twice
    for off in range(0, 12 * SPAN, 32 << 10):
        assert f.read(off, off + (32 << 10)) == tar[off:off + (32 << 10)]
    _wait_idle(f, fetch)
    spans = fetch.spans()
    assert len(spans) == len(set(spans)), f"spans fetched twice: {sorted(spans)}"
    assert max(spans) > 12, "read-ahead runs in front of a sequential reader"
    assert len(spans) < ztoc.num_spans, "read-ahead stops: the whole layer is not fetched"


def test_read_ahead_starts_small_and_grows_while_the_reader_goes_on(tmp_path, layer):
    # a random reader (a library's pages faulted in at scattered offsets) pays a small window per
    # miss; a sequential one doubles it with each first read of a span it brought, up to the whole
    lay, ztoc = layer
    tar = gzip.decompress(lay.blob)
    fetch = Ranges(lay.blob, ztoc)
    f = _fetcher(tmp_path, lay, ztoc, fetch)
    assert (READ_AHEAD_SPANS, READ_AHEAD_FIRST) == (8, 4)

    def read_span(i: int) -> None:
        s0, _ = ztoc.span_uncompressed_range(i)
        assert f.read(s0, s0 + 100) == tar[s0:s0 + 100]
        _wait_idle(f, fetch)

    read_span(2)
    assert sorted(fetch.spans()) == [2, 3, 4], "a miss: two spans ahead, not eight"
    read_span(3)                  # brought in a window of 2: the next is 4 spans (4-7)
    assert max(fetch.spans()) == 7
    read_span(4)                  # brought in that first window too: 4 spans from 5
    assert max(fetch.spans()) == 8
    read_span(5)                  # brought in a window of 4: the whole window, 8 spans
    assert max(fetch.spans()) == 5 + READ_AHEAD_SPANS
    spans = fetch.spans()
    assert len(spans) == len(set(spans)), f"spans fetched twice: {sorted(spans)}"
    read_span(20)                 # a miss elsewhere starts small again
    assert max(fetch.spans()) == 22


def test_read_ahead_of_a_corrupt_span_is_never_served_or_cached(tmp_path, layer):
    lay, ztoc = layer
    tar = gzip.decompress(lay.blob)
    fetch = Ranges(lay.blob, ztoc, corrupt={1})
    f = _fetcher(tmp_path, lay, ztoc, fetch)
    assert f.read(0, 100) == tar[:100]
    _wait_idle(f, fetch)
    assert not f.cache.has(1)
    s0, s1 = ztoc.span_uncompressed_range(1)
    with pytest.raises(IntegrityError):
        f.read(s0, s0 + 100)
    assert not f.cache.has(1)


def _file(ztoc: Ztoc, name: str):
    return next(ztoc.entry(i) for i in range(len(ztoc)) if ztoc.entry(i).name.endswith(name))


def test_read_ahead_stays_inside_the_file_and_spans_never_read_are_counted(tmp_path, layer):
    lay, ztoc = layer
    tar = gzip.decompress(lay.blob)
    f1 = _file(ztoc, "f1.bin")
    file_end = f1.offset + f1.size
    fetch = Ranges(lay.blob, ztoc)
    f = _fetcher(tmp_path / "bounded", lay, ztoc, fetch)
    assert f.read(f1.offset, f1.offset + 4096, ahead_until=file_end) == tar[f1.offset:f1.offset + 4096]
    _wait_idle(f, fetch)
    spans = fetch.spans()
    assert len(spans) > 1, "the rest of the file is read ahead"
    assert all(ztoc.span_uncompressed_range(i)[0] < file_end for i in spans), \
        f"read-ahead went past the file: spans {sorted(spans)}, file ends in {ztoc.spans_for(file_end - 1, file_end)}"
    use = f.span_use()
    assert use.fetched == len(set(spans)) and 0 < use.unread < use.fetched
    # the reader reads the whole file: every span fetched was used
    assert f.read(f1.offset, file_end, ahead_until=file_end) == tar[f1.offset:file_end]
    _wait_idle(f, fetch)
    use = f.span_use()
    assert use.unread == 0 and use.unread_bytes == 0
    assert f.stats.read_bytes == 4096 + f1.size

    # without a bound, read-ahead runs on into the next file, and those spans count as never read
    fetch = Ranges(lay.blob, ztoc)
    f = _fetcher(tmp_path / "unbounded", lay, ztoc, fetch)
    last = ztoc.spans_for(file_end - 1, file_end)[0]
    s0, _ = ztoc.span_uncompressed_range(last)
    f.read(s0, s0 + 10)
    _wait_idle(f, fetch)
    use = f.span_use()
    unread = sorted(set(fetch.spans()) - {last})
    assert unread and use.unread == len(unread)
    assert use.unread_bytes == sum(ztoc.span_compressed_range(i)[1] - ztoc.span_compressed_range(i)[0]
                                   for i in unread)


def test_a_header_check_plans_no_read_ahead_among_large_files_and_is_counted_apart(tmp_path, layer, monkeypatch):
    # spans inside files of 300 KiB hold a header or none: no lookup could want them, even once
    # the layer's checks have missed enough spans to read ahead among small files
    monkeypatch.setattr(span_fetcher, "HEADER_SCAN", 1)
    lay, ztoc = layer
    tar = gzip.decompress(lay.blob)
    f2 = _file(ztoc, "f2.bin")
    fetch = Ranges(lay.blob, ztoc)
    f = _fetcher(tmp_path, lay, ztoc, fetch)
    assert f.read(f2.offset - 512, f2.offset, header=True) == tar[f2.offset - 512:f2.offset]
    _wait_idle(f, fetch)
    assert sorted(set(fetch.spans())) == list(ztoc.spans_for(f2.offset - 512, f2.offset))
    use = f.span_use()
    assert use.unread == 0 and use.header_only == use.fetched > 0


@pytest.fixture(scope="module")
def small_files():
    # 2 KiB files of random bytes: a 64 KiB span holds the headers of about 25 of them
    entries = [Entry(f"pkg/m{i:03}.py", data=os.urandom(2 << 10)) for i in range(400)]
    layer = make_layer(entries, "gzip")
    return layer, Ztoc.parse(ztoc_for(layer, span_size=SPAN))


def test_a_header_check_that_misses_among_small_files_reads_the_next_spans_ahead(tmp_path, small_files,
                                                                                monkeypatch):
    # the next lookup's header is often in the next spans (a tar keeps a directory together): once
    # the layer's checks have missed HEADER_SCAN spans (a scan, not a small start's own path), a
    # check that misses fetches those too, beside it; a check served from the cache fetches nothing
    monkeypatch.setattr(span_fetcher, "HEADER_SCAN", 3)
    lay, ztoc = small_files
    tar = gzip.decompress(lay.blob)
    fetch = Ranges(lay.blob, ztoc)
    f = _fetcher(tmp_path, lay, ztoc, fetch)
    first = []
    for name in ("m000.py", "m300.py"):            # two misses far apart: nothing read ahead yet
        e = _file(ztoc, name)
        assert f.read(e.offset - 512, e.offset, header=True) == tar[e.offset - 512:e.offset]
        _wait_idle(f, fetch)
        first += ztoc.spans_for(e.offset - 512, e.offset)
    assert sorted(_whole_spans(fetch, ztoc)) == sorted(set(first)), "the first misses read nothing ahead"
    m = _file(ztoc, "m100.py")                      # the third: read ahead
    assert f.read(m.offset - 512, m.offset, header=True) == tar[m.offset - 512:m.offset]
    _wait_idle(f, fetch)
    own = list(ztoc.spans_for(m.offset - 512, m.offset))
    ahead = list(range(own[-1] + 1, own[-1] + 1 + HEADER_READ_AHEAD))
    assert not set(first) & set(own + ahead)
    spans = _whole_spans(fetch, ztoc)
    assert HEADER_READ_AHEAD > 0 and sorted(spans) == sorted([*set(first), *own, *ahead]), "each once, nothing else"
    use = f.span_use()
    assert use.header_only == len(set(first)) + len(own) and use.unread == len(ahead), \
        "spans read ahead are unread until a read"
    before, waited = len(fetch.requests), f.stats.read_wait
    assert waited > 0, "the miss waited for its span and says so"
    # the next lookup finds its header read ahead: no request, no wait
    n = _file(ztoc, "m130.py")
    assert set(ztoc.spans_for(n.offset - 512, n.offset)) <= set(ahead)
    assert f.read(n.offset - 512, n.offset, header=True) == tar[n.offset - 512:n.offset]
    _wait_idle(f, fetch)
    assert len(fetch.requests) == before, "a check the cache serves reads nothing ahead"
    assert f.stats.read_wait == waited, "a read the cache serves waited for nothing"


def test_header_read_ahead_stops_while_reads_leave_what_it_brings(tmp_path, monkeypatch):
    # a workload that takes a few packages of a directory of many looks its next name up far away:
    # the spans after each miss would be of packages no read wants, so past its first
    # HEADER_AHEAD_GRACE spans, read-ahead for header checks needs reads to have used some
    monkeypatch.setattr(span_fetcher, "HEADER_SCAN", 1)
    assert (span_fetcher.HEADER_AHEAD_GRACE, span_fetcher.HEADER_AHEAD_USE, HEADER_READ_AHEAD) == (4, 4, 2)
    entries = [Entry(f"nm/p{i:04}.js", data=os.urandom(2 << 10)) for i in range(1000)]
    lay = make_layer(entries, "gzip")
    ztoc = Ztoc.parse(ztoc_for(lay, span_size=SPAN))
    tar = gzip.decompress(lay.blob)
    fetch = Ranges(lay.blob, ztoc)
    f = _fetcher(tmp_path, lay, ztoc, fetch)

    def check(name: str) -> list[int]:
        """A lookup's header check of `name`; its header's spans."""
        e = _file(ztoc, name)
        assert f.read(e.offset - 512, e.offset, header=True) == tar[e.offset - 512:e.offset]
        _wait_idle(f, fetch)
        return list(ztoc.spans_for(e.offset - 512, e.offset))

    brought: list[int] = []
    for name in ("p0000.js", "p0200.js", "p0400.js"):      # far apart: nothing each brings is read
        own = check(name)
        brought += range(own[-1] + 1, own[-1] + 1 + HEADER_READ_AHEAD)
    assert set(brought) <= set(_whole_spans(fetch, ztoc)), "the first three misses read ahead"
    before = set(_whole_spans(fetch, ztoc))
    own = check("p0600.js")
    assert set(_whole_spans(fetch, ztoc)) == before | set(own), "6 spans brought, none read: no more"
    assert f.span_use().unread == 6
    # a lookup whose header one of them holds (a read used it): read-ahead goes on
    near = next(ztoc.entry(i).name for i in range(len(ztoc))
                if ztoc.spans_for(ztoc.entry(i).offset - 512, ztoc.entry(i).offset)[0] == brought[-1])
    check(near)
    own = check("p0800.js")
    assert set(range(own[-1] + 1, own[-1] + 1 + HEADER_READ_AHEAD)) <= set(_whole_spans(fetch, ztoc))


def test_a_span_the_prefetch_brought_in_is_no_miss_its_first_read_plans_nothing(tmp_path, layer):
    # only a header check's own miss stands for the file's first miss; spans a recorded prefetch
    # fetched hold what the recording read, and reading ahead of them brings in what it did not
    lay, ztoc = layer
    tar = gzip.decompress(lay.blob)
    f2 = _file(ztoc, "f2.bin")
    fetch = Ranges(lay.blob, ztoc)
    f = _fetcher(tmp_path, lay, ztoc, fetch)
    own = list(ztoc.spans_for(f2.offset - 512, f2.offset + 4096))
    f.ensure(own, background=True)                    # what the recorded prefetch does at mount
    _wait_idle(f, fetch)
    before = len(fetch.requests)
    assert f.read_cached(f2.offset - 512, f2.offset, header=True) == tar[f2.offset - 512:f2.offset]
    assert f.read_cached(f2.offset, f2.offset + 4096, f2.offset + f2.size) == tar[f2.offset:f2.offset + 4096]
    _wait_idle(f, fetch)
    assert len(fetch.requests) == before


def test_a_files_first_read_of_the_span_its_header_check_fetched_reads_ahead_inside_the_file(tmp_path, layer):
    # the lookup's header check took the miss the file's first read would have taken: that read
    # (served from the cache, as FUSE serves it first) plans the read-ahead a miss would have
    lay, ztoc = layer
    tar = gzip.decompress(lay.blob)
    f2 = _file(ztoc, "f2.bin")
    end = f2.offset + f2.size
    fetch = Ranges(lay.blob, ztoc)
    f = _fetcher(tmp_path, lay, ztoc, fetch)
    f.read(f2.offset - 512, f2.offset, header=True)
    _wait_idle(f, fetch)
    header_spans = sorted(set(fetch.spans()))
    assert list(ztoc.spans_for(f2.offset, f2.offset + 1)) == header_spans[-1:]
    assert f.read_cached(f2.offset, f2.offset + 4096, end) == tar[f2.offset:f2.offset + 4096]
    _wait_idle(f, fetch)
    ahead = sorted(set(fetch.spans()) - set(header_spans))
    assert ahead and ahead[0] == header_spans[-1] + 1, "the file's next spans are read ahead"
    assert all(ztoc.span_uncompressed_range(i)[0] < end for i in ahead), "never past the file's end"
    spans = fetch.spans()
    assert len(spans) == len(set(spans)), f"spans fetched twice: {sorted(spans)}"


def test_a_read_on_the_recorded_path_reads_ahead_only_what_the_recording_names(tmp_path, layer):
    # a view with a recorded prefetch: a miss among recorded spans brings in nothing the
    # recording does not name (the workload did not read it); off that path read-ahead is as usual
    lay, ztoc = layer
    tar = gzip.decompress(lay.blob)
    fetch = Ranges(lay.blob, ztoc)
    f = _fetcher(tmp_path, lay, ztoc, fetch)
    f.recorded = frozenset({0, 1, 3})
    assert f.read(10, 4106) == tar[10:4106]
    _wait_idle(f, fetch)
    assert set(fetch.spans()) <= {0, 1, 3}, f"read ahead off the recording: {sorted(fetch.spans())}"
    assert 3 in fetch.spans(), "what the recording names is read ahead"
    f.prefetch(4)                  # the file goes on past span 3: the recording says it is not read
    _wait_idle(f, fetch)
    assert 4 not in fetch.spans()
    s0, _ = ztoc.span_uncompressed_range(8)
    assert f.read(s0, s0 + 10) == tar[s0:s0 + 10]          # off the recorded path
    _wait_idle(f, fetch)
    assert 9 in fetch.spans(), "a read off the recorded path reads ahead as usual"


def test_the_span_cache_tells_other_readers_which_spans_reads_have_touched(tmp_path, layer):
    # the FUSE session holder answers READs of spans in state SPAN_READ only: cached, read by
    # file data here, and no read-ahead waiting for their first read (service/holder_reads.py)
    import mmap
    from lazyoci.service.holder_reads import SPAN_CACHED, SPAN_READ

    lay, ztoc = layer
    fetch = Ranges(lay.blob, ztoc)
    f = _fetcher(tmp_path, lay, ztoc, fetch)
    states = mmap.mmap(f.cache.states_fd, ztoc.num_spans, prot=mmap.PROT_READ)
    assert f.read(10, 4106) == gzip.decompress(lay.blob)[10:4106]
    _wait_idle(f, fetch)
    ahead = sorted(set(fetch.spans()) - {0})
    assert ahead
    assert states[0] == SPAN_READ, "read by file data and cached"
    assert all(states[i] == SPAN_CACHED for i in ahead), "read ahead: its first read is still to come"
    s0, _ = ztoc.span_uncompressed_range(ahead[0])
    f.read_cached(s0, s0 + 10)
    assert states[ahead[0]] == SPAN_READ
    f.read(ztoc.span_uncompressed_range(ahead[1])[0], ztoc.span_uncompressed_range(ahead[1])[0] + 10, header=True)
    assert states[ahead[1]] == SPAN_CACHED, "a tar header check is no file data read"
    f.cache.evict(1 << 30)
    assert not any(states[:ztoc.num_spans]), "evicted"
    states.close()
    f.cache.close()
