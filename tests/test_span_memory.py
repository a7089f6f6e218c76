"""Memory per read is bounded in bytes whatever span size an index declares: the write-behind
queue holds at most its byte budget (a larger span alone), and a span larger than the
read-ahead budget is never read ahead. On a real layer at the largest span size lazyoci
accepts, with the real span manager (fetches recorded as in test_lazy_readahead)."""

from __future__ import annotations

import gzip
import io
import threading

import pytest

from helpers.images import Entry, make_layer
from lazyoci.fs.span_fetcher import READ_AHEAD_INFLATED
from lazyoci.fs.workers import WriteBehind
from lazyoci.ztoc import Ztoc, build_ztoc, limits
from test_lazy_readahead import Ranges, _fetcher, _wait_idle


def test_write_behind_queue_is_bounded_in_bytes():
    writer = WriteBehind(100)
    gate, stored = threading.Event(), []

    def job(n: int) -> None:
        gate.wait(60)
        stored.append(n)

    writer.submit(lambda: job(1), 60)
    second = threading.Thread(target=writer.submit, args=(lambda: job(2), 60))
    second.start()
    second.join(0.5)       # 60 + 60 bytes would pass the bound: the second span waits
    assert second.is_alive() and writer.queued_bytes == 60
    gate.set()
    second.join(60)
    writer.flush()
    assert stored == [1, 2] and writer.queued_bytes == 0
    writer.submit(lambda: stored.append(3), 500)      # larger than the bound: goes through alone
    writer.flush()
    assert stored == [1, 2, 3]


@pytest.fixture(scope="module")
def big_spans():
    """A layer of one 130 MiB file of zeros and its zTOC at the largest span size: 3 spans,
    two of them over the read-ahead budget."""
    layer = make_layer([Entry("zeros.bin", data=bytes(130 << 20))], "gzip")
    ztoc = Ztoc.parse(build_ztoc(io.BytesIO(layer.blob), "gzip", limits.MAX_SPAN_SIZE.value))
    sizes = [ztoc.span_uncompressed_range(i)[1] - ztoc.span_uncompressed_range(i)[0] for i in range(ztoc.num_spans)]
    assert ztoc.num_spans == 3 and sizes[1] > READ_AHEAD_INFLATED, sizes
    return layer, ztoc


def test_a_span_over_the_read_ahead_budget_is_never_read_ahead(tmp_path, big_spans):
    layer, ztoc = big_spans
    fetch = Ranges(layer.blob, ztoc)
    f = _fetcher(tmp_path, layer, ztoc, fetch)
    assert f.read(512, 518) == bytes(6)
    f.prefetch(1)                      # what a FUSE read near a span's end asks for
    _wait_idle(f, fetch)
    assert fetch.requests == [ztoc.span_compressed_range(0)], "only the span the read needs is fetched"
    s0 = ztoc.span_uncompressed_range(1)[0]
    assert f.read(s0, s0 + 6) == gzip.decompress(layer.blob)[s0:s0 + 6]
    _wait_idle(f, fetch)
    assert fetch.requests[:2] == [ztoc.span_compressed_range(0), ztoc.span_compressed_range(1)]
