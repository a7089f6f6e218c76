"""Spans taken as their bytes arrive: the zTOC's span receiver and the span manager's streamed
requests, on real gzip layers (one member, and many members as pigz and concatenations make)."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from helpers.images import LAYER_GZIP, Entry, Layer, make_layer, sha, tar_bytes
from helpers.lazy import wait_fetches_settle, ztoc_for
from lazyoci.errors import FormatError, IntegrityError
from lazyoci.fs.span_cache import SpanCache
from lazyoci.fs.span_fetcher import ATTEMPTS, SpanFetcher
from lazyoci.ztoc import Ztoc
from lazyoci.ztoc.zinfo import SpanInflater

SPAN = 64 << 10


def _entries(seed: int) -> list[Entry]:
    rnd = random.Random(seed)
    out = []
    for i in range(12):
        text = b"".join(b"line %d of file %d\n" % (j, i) for j in range(rnd.randrange(500, 6000)))
        out.append(Entry(f"d/text{i}.txt", data=text))
        out.append(Entry(f"d/blob{i}.bin", data=os.urandom(rnd.randrange(1, 90 << 10))))
    return out


@pytest.fixture(scope="module")
def one_member():
    layer = make_layer(_entries(1), "gzip")
    return layer, Ztoc.parse(ztoc_for(layer, span_size=SPAN))


@pytest.fixture(scope="module")
def members():
    raw = tar_bytes(_entries(2))
    cuts = sorted(random.Random(3).sample(range(1, len(raw)), 9))
    parts = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
    layer = Layer(b"".join(gzip.compress(p, compresslevel=6, mtime=0) for p in parts), sha(raw), LAYER_GZIP)
    return layer, Ztoc.parse(ztoc_for(layer, span_size=SPAN))


def _pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, k = [], 0, 0
    while pos < len(data):
        n = sizes[k % len(sizes)]
        out.append(data[pos:pos + n])
        pos, k = pos + n, k + 1
    return out


# pieces of every small size put their ends at every few bytes (a trailer or the first byte split
# anywhere), without a call per byte
@pytest.mark.parametrize("sizes", [[1, 2, 3, 5, 8, 13, 2039], [7, 1, 9, 4096], [65536, 5]])
@pytest.mark.parametrize("which", ["one_member", "members"])
def test_a_span_inflated_in_pieces_is_the_span_inflated_whole(request, which, sizes):
    layer, ztoc = request.getfixturevalue(which)
    assert ztoc.num_spans >= 8
    if which == "members":
        assert sum(1 for i in range(ztoc.num_spans) if ztoc.checkpoints.bits[i]) > 0
    for i in range(ztoc.num_spans):
        c0, c1 = ztoc.span_compressed_range(i)
        compressed = layer.blob[c0:c1]
        whole = ztoc.decompress_span(i, compressed)
        u0, u1 = ztoc.span_uncompressed_range(i)
        inf = SpanInflater(ztoc.checkpoints, i, u1 - u0)
        for piece in _pieces(compressed, sizes):
            inf.feed(piece)
        assert inf.finish() == whole, f"span {i}"
        receiver = ztoc.span_receiver(i)
        for piece in _pieces(compressed, sizes):
            receiver.feed(piece)
        assert receiver.finish() == whole, f"span {i} through its receiver"


def test_a_receiver_refuses_bytes_that_are_not_the_span_before_judging_their_inflate(one_member, monkeypatch):
    layer, ztoc = one_member
    c0, c1 = ztoc.span_compressed_range(3)
    good = layer.blob[c0:c1]
    for bad in (good[:-1],                                  # short
                good[:100] + bytes([good[100] ^ 0xFF]) + good[101:],   # one byte flipped
                b"\xff" * len(good)):                       # not deflate at all
        receiver = ztoc.span_receiver(3)
        receiver.feed(bad)
        with pytest.raises(IntegrityError):
            receiver.finish()
    # bytes that match the digest but do not inflate: the zTOC itself is wrong
    garbage = b"\xff" * len(good)
    monkeypatch.setattr(Ztoc, "span_digest", lambda self, i: "sha256:" + hashlib.sha256(garbage).hexdigest())
    receiver = ztoc.span_receiver(3)
    receiver.feed(garbage)
    with pytest.raises(FormatError):
        receiver.finish()


def test_a_short_span_is_a_format_error_of_the_inflater(one_member):
    layer, ztoc = one_member
    c0, c1 = ztoc.span_compressed_range(2)
    u0, u1 = ztoc.span_uncompressed_range(2)
    inf = SpanInflater(ztoc.checkpoints, 2, u1 - u0)
    inf.feed(layer.blob[c0:c0 + (c1 - c0) // 2])
    with pytest.raises(FormatError, match="end .* before the span does"):
        inf.finish()


class Streams:
    """A registry's Range answers as a stream of pieces, every request recorded; `corrupt`
    spans have a byte flipped in their first `corrupt_times` answers; `drop_once` ends the
    first attempt of each request halfway (the transport then starts over with a new sink)."""

    def __init__(self, blob: bytes, ztoc: Ztoc, corrupt: set[int] = frozenset(), corrupt_times: int = 1,
                 drop_once: bool = False, piece: int = 4093, extra: int = 0) -> None:
        self.blob, self.ztoc, self.corrupt, self.corrupt_times = blob, ztoc, corrupt, corrupt_times
        self.drop_once, self.piece, self.extra = drop_once, piece, extra
        self.requests: list[tuple[int, int]] = []
        self.served: dict[int, int] = {}
        self.pause_after: tuple[int, threading.Event] | None = None   # (blob offset, resume)
        self.lock = threading.Lock()

    def fetch(self, start: int, end: int) -> bytes:
        raise AssertionError("a streamed fetcher asks for no whole range")

    def stream(self, start: int, end: int, begin) -> None:
        with self.lock:
            self.requests.append((start, end))
        data = bytearray(self.blob[start:end])
        for i in self.corrupt:
            c0, _ = self.ztoc.span_compressed_range(i)
            if start <= c0 + 50 < end and self.served.get(i, 0) < self.corrupt_times:
                self.served[i] = self.served.get(i, 0) + 1
                data[c0 + 50 - start] ^= 0xFF
        if self.drop_once:
            sink = begin()
            for k in range(0, len(data) // 2, self.piece):
                sink(bytes(data[k:min(k + self.piece, len(data) // 2)]))
        sink = begin()
        for k in range(0, len(data), self.piece):
            if self.pause_after is not None and start + k >= self.pause_after[0]:
                assert self.pause_after[1].wait(20), "the request's first span was not handed over mid-request"
                self.pause_after = None
            sink(bytes(data[k:k + self.piece]))
        if self.extra:    # a registry sending more than the range: the transport's count refuses it
            sink(b"\0" * self.extra)
            raise IntegrityError(f"range returned {end - start + self.extra} bytes, expected {end - start}")


def _fetcher(tmp_path: Path, layer: Layer, ztoc: Ztoc, streams: Streams) -> SpanFetcher:
    spans = [ztoc.span_uncompressed_range(i) for i in range(ztoc.num_spans)]
    cache = SpanCache(tmp_path / "cache").layer(layer.digest, "sha256:" + "1" * 64, spans)
    return SpanFetcher(ztoc, streams.fetch, cache, layer.digest, stream_range=streams.stream)


@pytest.mark.parametrize("which", ["one_member", "members"])
def test_streamed_reads_serve_the_layer_byte_for_byte(request, tmp_path, which):
    layer, ztoc = request.getfixturevalue(which)
    tar = gzip.decompress(layer.blob)[:ztoc.uncompressed_size]   # (zero padding past the archive's end is not served)
    streams = Streams(layer.blob, ztoc, drop_once=True)
    f = _fetcher(tmp_path, layer, ztoc, streams)
    # a read across many spans: one request, each span taken once although its first attempt dropped
    assert f.read(100, 6 * SPAN + 7) == tar[100:6 * SPAN + 7]
    for off in range(0, len(tar), 50_000):
        assert f.read(off, off + 20_000) == tar[off:off + 20_000]
    wait_fetches_settle(streams.requests)
    assert f.stats.spans == len({i for lo, hi in streams.requests for i in range(ztoc.num_spans)
                                 if lo <= ztoc.span_compressed_range(i)[0] and ztoc.span_compressed_range(i)[1] <= hi})


def test_a_request_answered_with_more_bytes_than_asked_is_an_integrity_error(tmp_path, one_member):
    # every span of it verified before the surplus showed, and is kept; the read still fails clearly
    layer, ztoc = one_member
    tar = gzip.decompress(layer.blob)
    streams = Streams(layer.blob, ztoc, extra=100)
    f = _fetcher(tmp_path, layer, ztoc, streams)
    s0, _ = ztoc.span_uncompressed_range(2)
    _, e3 = ztoc.span_uncompressed_range(3)
    with pytest.raises(IntegrityError, match="returned"):
        f.read(s0, e3, read_ahead=False)
    streams.extra = 0
    assert f.read(s0, e3, read_ahead=False) == tar[s0:e3]


def test_a_corrupted_span_is_fetched_again_and_one_corrupted_every_time_is_an_integrity_error(tmp_path, one_member):
    layer, ztoc = one_member
    tar = gzip.decompress(layer.blob)
    s0, s1 = ztoc.span_uncompressed_range(2)
    streams = Streams(layer.blob, ztoc, corrupt={2})
    f = _fetcher(tmp_path / "once", layer, ztoc, streams)
    assert f.read(s0, s1) == tar[s0:s1]
    assert streams.served[2] == 1
    streams = Streams(layer.blob, ztoc, corrupt={4}, corrupt_times=ATTEMPTS)
    f = _fetcher(tmp_path / "always", layer, ztoc, streams)
    s0, s1 = ztoc.span_uncompressed_range(4)
    with pytest.raises(IntegrityError):
        f.read(s0, s1, read_ahead=False)
    assert streams.served[4] == ATTEMPTS


def test_a_requests_first_span_is_served_before_its_last_bytes_arrive(tmp_path, one_member):
    layer, ztoc = one_member
    tar = gzip.decompress(layer.blob)
    streams = Streams(layer.blob, ztoc)
    f = _fetcher(tmp_path, layer, ztoc, streams)
    resume = threading.Event()
    # the request for spans 1-4 stops in span 4 until a read of span 1 has been answered
    streams.pause_after = (ztoc.span_compressed_range(4)[0] + 10, resume)
    s0, _ = ztoc.span_uncompressed_range(1)
    _, e4 = ztoc.span_uncompressed_range(4)
    got: dict[str, bytes] = {}
    whole = threading.Thread(target=lambda: got.update(whole=f.read(s0, e4, read_ahead=False)))
    whole.start()
    while not streams.requests:
        threading.Event().wait(0.01)
    s1 = ztoc.span_uncompressed_range(1)[1]
    assert f.read(s0, s1, read_ahead=False) == tar[s0:s1]
    resume.set()
    whole.join(30)
    assert got["whole"] == tar[s0:e4]
    assert len(streams.requests) == 1


def test_verified_bytes_that_do_not_inflate_fail_the_read_without_a_retry(tmp_path, one_member, monkeypatch):
    # the zTOC vouches for bytes that are not deflate data: an error of the index, not of the fetch
    layer, ztoc = one_member
    c0, c1 = ztoc.span_compressed_range(3)
    blob = bytearray(layer.blob)
    blob[c0:c1] = b"\xff" * (c1 - c0)
    garbage = hashlib.sha256(bytes(blob[c0:c1])).hexdigest()
    real = Ztoc.span_digest
    monkeypatch.setattr(Ztoc, "span_digest", lambda self, i: "sha256:" + garbage if i == 3 else real(self, i))
    streams = Streams(bytes(blob), ztoc)
    f = _fetcher(tmp_path, layer, ztoc, streams)
    s0, s1 = ztoc.span_uncompressed_range(3)
    with pytest.raises(FormatError):
        f.read(s0, s1, read_ahead=False)
    assert len(streams.requests) == 1
    assert not f.cache.has(3)
