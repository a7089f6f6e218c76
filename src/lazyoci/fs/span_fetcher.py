"""The span manager: fetch, verify, decompress and cache only the spans a read needs.

A read of uncompressed [start, end) of a layer's tar stream needs the zTOC spans
covering it. Spans already in the disk cache are read from there; the missing
ones are fetched with HTTP Range requests — adjacent missing spans in ONE request —
and each span is checked against its sha256 in the zTOC before anything uses it.
A span is never fetched twice at once: the first reader claims it with a Future,
later readers wait on that Future. On a digest mismatch the span is fetched again
(3 attempts in all, as the reference does); then the read fails with
IntegrityError (EIO at the FUSE edge). Unverified bytes are never returned.

Everything here is synchronous and thread-safe: FUSE handlers call it through
`trio.to_thread.run_sync`, so reads of different spans proceed in parallel
(zlib and hashlib release the GIL).

Read-ahead: a read that misses the cache also plans the next spans of the layer
(up to READ_AHEAD_SPANS, READ_AHEAD_BYTES compressed and READ_AHEAD_INFLATED
inflated; a span larger than that alone is never read ahead), but never past
`ahead_until`: the FUSE layer passes the end of the file being read, so read-ahead
stays inside files a workload opens and never brings in spans it does not touch
(bytes fetched and never read are counted, see FetchStats); they are requested by a
small pool of daemon threads as soon as the missed span's own bytes have arrived,
so they never share the link with it, and travel while it is inflated and the
reader moves on. The first read of a span that read-ahead brought in moves the
window on: a sequential reader keeps a pipeline full, a random one stops after
one window. That window starts at a quarter of the bounds above (READ_AHEAD_FIRST) and each
first read of a span it brought doubles it, up to the whole: a sequential reader reaches a full
pipeline within a few spans, while a random one (the pages of a large library faulted in at
scattered offsets) pays a small window per miss, not 16 MiB. A file's first data read of a
span that only its lookup's tar header check fetched plans as a miss would: that check took the
miss early. A header check that misses
also reads ahead the next HEADER_READ_AHEAD spans if they hold many entries' headers: a tar
keeps a directory's entries together, and an interpreter's imports look up one small file after
another, each waiting for the last, so the next lookup's header is often in the next span or
the one after (bench/README.md: on the python-ml image a third less time waiting for the
network, for about 13% more bytes). It starts once HEADER_SCAN spans of the layer have missed
for header checks: a few misses are a small start's own path (the python3 image's start misses
nine, and reading ahead beside them moved a third more bytes for a quarter second), many are
a workload scanning a tree; and it goes on only while reads use some of what it brought (a
workload taking a few packages of node_modules looks its next name up far away). A layer of a
few large files reads nothing ahead for lookups.
A view with a recorded prefetch (`recorded`) knows what its workload reads: a read of spans
the recording names reads ahead only spans it names too; a read off that path as usual.

Neighbours: in an index whose spans are chunks of single files (`spans_within_files`: eStargz,
zstd:chunked), a small file is one span, so a start that reads a thousand small files would
make a thousand requests, each waiting a round trip for the last (python-ml as eStargz: 1,767
requests, 46 s waiting). There read-ahead goes on past the end of the file being read, into the
files the stream keeps next to it (a directory's files together, as the image was built): at
most NEIGHBOR_BYTES compressed of small spans (each at most NEIGHBOR_SPAN_BYTES), in requests
of up to RUN_BYTES. What it brings in and no read uses counts as never read. A zTOC's span
already holds a file's neighbours: its read-ahead stays inside the file.

Several ranges in one request: with `fetch_ranges`, the runs of adjacent spans one call needs
(the recorded prefetch asks for the next spans of its list, rarely adjacent) go in one request
of up to MAX_RANGES_PER_REQUEST ranges, within the same bytes held; each span is verified as
ever, and one that fails is fetched again alone. A registry that answers such a request with
the whole blob, one range or a mangled multipart answer (`fetch_ranges` gives None) is asked
one run per request from then on (`multi_range`).

Streamed requests: where the index offers span receivers (a zTOC's) and the layer server a
`stream_range`, a request's bytes go into the receivers of its spans as they arrive, each hashed
and inflated piece by piece (zlib and hashlib release the GIL while the socket fills); a span is
checked against its digest, then handed over, once its last byte is in, while the request's
later spans still travel. A read that misses then waits for its bytes and the inflate of their
last piece, not for the bytes and then the inflate of the whole span (8-15 ms a 4 MiB span).

Write-behind: a span is handed to the reader (and to every waiter) as soon as it
is verified and inflated; one writer thread stores it in the disk cache. Until the
cache has it, its resolved Future stays in `_inflight`, so no read fetches it again.

Memory: every bound is in bytes, so it holds whatever span size an index declares
(ztoc/limits.py caps a span at MAX_SPAN_BYTES): one request holds at most
MAX_REQUEST_BYTES of compressed and inflated spans (or one span alone), the
writer's queue at most WRITE_BEHIND_BYTES (or one span alone).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Callable

from lazyoci.errors import IntegrityError, LazyociError
from lazyoci.fs import header_regions
from lazyoci.fs.layer_index import LayerIndex
from lazyoci.fs.span_cache import LayerCache
from lazyoci.fs.streamed_spans import RangeSink, StreamedSpans
from lazyoci.fs.workers import ReadAheadPool, WriteBehind

log = logging.getLogger(__name__)

FetchRange = Callable[[int, int], bytes]     # compressed blob bytes [start, end)
# several ranges' bytes in one request, or None where the registry serves one range per request
FetchRanges = Callable[[list[tuple[int, int]]], "list[bytes] | None"]
# one range's bytes into a sink as they arrive: each attempt takes a new sink from the callable
StreamRange = Callable[[int, int, Callable[[], RangeSink]], None]
MAX_SPANS_PER_REQUEST = 16                   # spans per Range request ...
MAX_REQUEST_BYTES = 128 << 20                # ... and their compressed + inflated bytes (16 x 2 x 4 MiB)
MAX_RANGES_PER_REQUEST = 16                  # runs of spans asked for in one request (several ranges)
ATTEMPTS = 3
# A span whose fetch just failed (a stalled registry, after its retries) fails again at once for
# this long: the kernel asks again for the page of a failed read-ahead straight away, and that
# request should not wait for the registry's deadline a second time.
RECENT_FAILURE_SECONDS = 2.0
READ_AHEAD_SPANS = 8                         # spans queued past a missed read
READ_AHEAD_BYTES = 16 << 20                  # ... and at most this many compressed bytes
READ_AHEAD_INFLATED = 32 << 20               # ... and inflated bytes (a larger span: no read-ahead)
READ_AHEAD_WORKERS = 4                       # Range requests in flight for read-ahead
READ_AHEAD_FIRST = 4                         # a miss reads ahead 1/this of the above (span counts and
                                             # bytes); each first read of a span it brought doubles it
HEADER_READ_AHEAD = 2                        # spans fetched beside a tar header check's miss ...
HEADER_DENSE = 16                            # ... each holding at least this many entries' headers,
HEADER_SCAN = 10                             # ... once the layer's header checks have missed this many spans,
HEADER_AHEAD_GRACE = 4                       # ... and, past the first this many spans it brought,
HEADER_AHEAD_USE = 4                         # ... while reads touch one in this many of them
READ_AHEAD_RUN = 2                           # spans per read-ahead request ...
RUN_BYTES = 256 << 10                        # ... or more, while they hold fewer compressed bytes
NEIGHBOR_BYTES = 1 << 20                     # compressed bytes read ahead past a file's end ...
NEIGHBOR_SPANS = 64                          # ... in at most this many spans ...
NEIGHBOR_SPAN_BYTES = 256 << 10              # ... each at most this large (indexes of file chunks)
READ_AHEAD_QUEUE = 64                        # queued read-aheads; more are skipped, not queued
WRITE_BEHIND_BYTES = 64 << 20                # verified spans waiting for the disk (16 x 4 MiB)
MAX_RECORDED_RANGES = 1 << 20                # read ranges a recording keeps per layer (~100 MB at most)

_POOL = ReadAheadPool(READ_AHEAD_WORKERS, READ_AHEAD_QUEUE)
_WRITER = WriteBehind(WRITE_BEHIND_BYTES)


def flush_cache_writes() -> None:
    """Store every verified span still waiting for the disk (call before closing span caches)."""
    _WRITER.flush()


@dataclass
class FetchStats:
    """What went over the network for one layer (shown by `service status`), and how much of it
    reads used: a span fetched and never read is read-ahead or background fetch that did not pay."""

    requests: int = 0
    bytes: int = 0
    spans: int = 0
    last_fetch: float = 0.0
    read_bytes: int = 0            # bytes handed to reads (file data and tar header checks)
    read_wait: float = 0.0         # seconds reads waited for spans to arrive (summed over reads)


@dataclass(frozen=True)
class SpanUse:
    """The spans this service run fetched for one layer, by what read them since."""

    fetched: int                   # spans fetched
    fetched_bytes: int             # their compressed bytes
    unread: int                    # spans fetched that no read has touched
    unread_bytes: int              # their compressed bytes
    header_only: int               # spans only tar header checks read (no file data)
    neighbors: int = 0             # spans read ahead past the end of the file read (`spans_within_files`)
    neighbors_unread_bytes: int = 0   # the compressed bytes of those no read has touched
    neighbors_bytes: int = 0       # the compressed bytes of them all


class SpanFetcher:
    """Serves uncompressed byte ranges of one lazy layer."""

    def __init__(self, ztoc: LayerIndex, fetch_range: FetchRange, cache: LayerCache,
                 layer_digest: str, fetch_ranges: FetchRanges | None = None,
                 stream_range: StreamRange | None = None) -> None:
        self.ztoc = ztoc
        self.fetch_range = fetch_range
        # a run of spans streamed into the index's span receivers, where both offer it
        self.stream_range = stream_range if hasattr(ztoc, "span_receiver") else None
        # several runs of spans in one request; None once the registry has served one range only
        self.fetch_ranges = fetch_ranges
        self.cache = cache
        self.layer_digest = layer_digest
        self.on_stored: Callable[[], None] | None = None   # runs after each span reaches the disk cache
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._inflight: dict[int, Future] = {}
        # spans queued or brought in by read-ahead, not read yet -> n: the window their first read
        # opens is 1/n of the whole (READ_AHEAD_FIRST unless they came in a read-ahead window)
        self._ahead: dict[int, int] = {}
        self._failed: dict[int, tuple[float, str]] = {}   # span -> (monotonic time its fetch failed, why)
        self._fetched: set[int] = set()           # spans this run fetched and verified
        self._neighbor_spans: set[int] = set()    # spans read ahead past the end of the file read
        self._read_data: set[int] = set()         # spans file data reads touched
        self._read_header: set[int] = set()       # spans tar header checks touched
        self._header_missed: set[int] = set()     # spans a tar header check found neither cached nor on their way
        self._header_ahead: set[int] = set()      # spans header read-ahead brought in, no read touched yet
        self._header_ahead_sent = 0               # spans header read-ahead has brought in (the others: touched)
        self._order: dict[int, None] = {}         # every span reads touched, in the order of first touch
        self.recorded: frozenset[int] = frozenset()   # the spans the view's recorded prefetch names
        # a recording service's (`soci optimize`): the byte ranges reads asked for, in order
        self.ranges: list[tuple[int, int]] | None = None
        self.last_demand = 0.0                    # monotonic time of the last on-demand fetch
        self.first_read_at: float | None = None   # wall time of the first read (a lazy start's phases)
        # spans are chunks of single files: read-ahead goes on into the next files (module docstring)
        self._neighbors = bool(getattr(ztoc, "spans_within_files", False))
        # header checks may still read the stream's tar headers: `_store` keeps those of each span
        # in memory (fs/header_regions.py); off once the layer's every header is known good
        self.keep_headers = bool(getattr(ztoc, "headers_in_stream", True))

    # -- public --------------------------------------------------------------

    def read(self, start: int, end: int, background: bool = False, read_ahead: bool = True,
             ahead_until: int | None = None, header: bool = False) -> bytes:
        """Verified uncompressed bytes [start, end) of the layer's tar stream.

        `read_ahead=False` for reads that say nothing of what comes next; `header=True` for a
        tar header checked for a lookup (read-ahead of the next HEADER_READ_AHEAD spans only, on a
        miss: the file's own data reads plan theirs).
        Read-ahead plans no span starting at or past `ahead_until` (the end of the file read;
        None: the end of the layer)."""
        if end <= start:
            return b""
        if header and not background:
            with self._lock:
                self._header_missed.update(i for i in self.ztoc.spans_for(start, end)
                                           if not self.cache.has(i) and i not in self._inflight)
        after_header = False if background else \
            self._note_read(self.ztoc.spans_for(start, end), start, end, header)
        if background or not read_ahead:
            ahead = []
        elif header:
            ahead = self._plan_header_read_ahead(self.ztoc.spans_for(start, end))
        else:
            ahead = self._plan_read_ahead(self.ztoc.spans_for(start, end), ahead_until, after_header)
        start_ahead = (lambda: self._submit_read_ahead(ahead)) if ahead else None
        for _ in range(4):   # a span evicted between fetch and read is simply fetched again
            asked = time.monotonic()
            fresh = self.ensure(self.ztoc.spans_for(start, end), background=background,
                                on_transfer=start_ahead)
            if fresh and not background:      # a read that found every span cached waited for none
                with self._lock:
                    self.stats.read_wait += time.monotonic() - asked
            start_ahead = None
            out = bytearray()
            ok = True
            for i in self.ztoc.spans_for(start, end):
                s0, s1 = self.ztoc.span_uncompressed_range(i)
                lo, hi = max(start, s0), min(end, s1)
                if i in fresh:
                    out += fresh[i][lo - s0:hi - s0]
                    continue
                piece = self.cache.read_span_range(i, lo, hi)
                if piece is None:
                    ok = False
                    break
                out += piece
            if ok:
                return bytes(out)
        raise LazyociError(f"layer {self.layer_digest}: span cache too small to serve a read")

    def read_cached(self, start: int, end: int, ahead_until: int | None = None,
                    header: bool = False) -> bytes | None:
        """Bytes [start, end) if every span of them is in the disk cache, else None; never waits
        for the network, so the FUSE loop serves cache hits itself without a thread hop."""
        spans = self.ztoc.spans_for(start, end)
        if not spans or not all(self.cache.has(i) for i in spans):
            return None
        after_header = self._note_read(spans, start, end, header)
        if not header:
            # a first touch of read-ahead moves the window on, as does a file's first read of a span
            # its tar header's check fetched (that check took the miss the read would have taken)
            ahead = self._plan_read_ahead(spans, ahead_until, after_header)
            if ahead:
                self._submit_read_ahead(ahead)
        parts = []
        read = self.cache.read_header_range if header else self.cache.read_span_range
        for i in spans:
            s0, s1 = self.ztoc.span_uncompressed_range(i)
            piece = read(i, max(start, s0), min(end, s1))
            if piece is None:
                return None
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def prefetch(self, span: int) -> None:
        """Fetch `span` in the background (read-ahead for a file that goes on past a read), unless
        a recorded prefetch says the workload reads the span before and not this one."""
        if 0 <= span < self.ztoc.num_spans and not self.cache.has(span) and \
                self._inflated(span) <= READ_AHEAD_INFLATED and self._off_record([span - 1], [span]):
            self._submit_read_ahead(self._claim_ahead([span]))

    def _off_record(self, read: range | list[int], ahead: list[int]) -> list[int]:
        """Of the spans `ahead` of a read of `read`, those to read ahead: all of them, unless the
        view has a recorded prefetch naming every span read (the workload is on its recorded
        path): then only those the recording names too (the prefetch brings them anyway, read-ahead
        may bring them sooner). Read-ahead past what a recorded workload reads is bytes fetched and
        never read; a read off the recorded path reads ahead as usual."""
        recorded = self.recorded
        if not recorded or not all(i in recorded for i in read):
            return ahead
        return [j for j in ahead if j in recorded]

    def fetch_ahead(self, spans: list[int], min_headers: int = 0, most_bytes: int = 0,
                    after: int | None = None, most_spans: int = 0) -> int:
        """Fetch `spans` on the read-ahead threads, in the order given (adjacent ones together):
        a caller's guess of what reads need next (fs/sibling_headers.py). Skipped: spans cached,
        on their way, too large to read ahead, holding fewer than `min_headers` entries'
        headers, (with `most_bytes` or `most_spans`) those past that many compressed bytes or
        spans, and (with `after`, the
        span whose read the guess follows) those a recorded prefetch leaves out while that read is
        on its recorded path (`_off_record`). Returns how many were queued."""
        if after is not None:
            spans = self._off_record([after], spans)
        want: list[int] = []
        budget = most_bytes
        for j in spans:
            if not 0 <= j < self.ztoc.num_spans or self._inflated(j) > READ_AHEAD_INFLATED or \
                    self.cache.has(j) or j in self._inflight or j in self._ahead or \
                    (min_headers and self._entries_in(j) < min_headers):
                continue     # (on their way: a glance without the lock; _claim_ahead decides)
            if most_bytes:
                c0, c1 = self.ztoc.span_compressed_range(j)
                budget -= c1 - c0
                if budget < 0:
                    break
            want.append(j)
            if len(want) == most_spans:
                break
        claimed = self._claim_ahead(want)
        rank = {j: k for k, j in enumerate(claimed)}
        runs = sorted(_runs(claimed, READ_AHEAD_RUN), key=lambda run: min(rank[j] for j in run))
        return self._submit_runs(runs)

    def _claim_ahead(self, spans: list[int], share: int = READ_AHEAD_FIRST) -> list[int]:
        """Mark the spans that are neither cached nor on their way as read-ahead whose first read
        opens a window of 1/`share` of the whole; returns them."""
        out = []
        with self._lock:
            for j in spans:
                if j not in self._inflight and j not in self._ahead and not self.cache.has(j):
                    self._ahead[j] = share
                    out.append(j)
        return out

    def span_use(self) -> SpanUse:
        """How much of what this run fetched reads have used so far."""
        with self._lock:
            fetched = set(self._fetched)
            data, header = set(self._read_data), set(self._read_header)
            neighbors = fetched & self._neighbor_spans
        unread = fetched - data - header
        return SpanUse(fetched=len(fetched), fetched_bytes=self._compressed(fetched),
                       unread=len(unread), unread_bytes=self._compressed(unread),
                       header_only=len(fetched & header - data), neighbors=len(neighbors),
                       neighbors_unread_bytes=self._compressed(neighbors & unread),
                       neighbors_bytes=self._compressed(neighbors))

    def _compressed(self, spans: set[int]) -> int:
        return sum(c1 - c0 for c0, c1 in map(self.ztoc.span_compressed_range, spans))

    def read_order(self) -> list[int]:
        """The spans reads have touched since the mount, in the order they first did (what
        `lazyoci soci optimize` records as the layer's prefetch artifact)."""
        with self._lock:
            return list(self._order)

    def read_ranges(self) -> list[tuple[int, int]]:
        """The uncompressed ranges reads asked for since the mount, in their order, if `ranges`
        records them (a recording service), else none: what `soci optimize` lays spans out by.
        No ranges either once more than MAX_RECORDED_RANGES were asked for (the spans stay recorded)."""
        with self._lock:
            return list(self.ranges or ())

    def _record_range(self, start: int, end: int) -> None:
        """Keep a read's range, joined to the last one if it follows on (a file read in order is
        one range); past MAX_RECORDED_RANGES none is kept (lock held, `ranges` recording)."""
        ranges = self.ranges
        assert ranges is not None
        if ranges and ranges[-1][0] <= start <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        elif len(ranges) < MAX_RECORDED_RANGES:
            ranges.append((start, end))
        else:
            log.warning("layer %s: over %d read ranges recorded: its spans are recorded, not its ranges",
                        self.layer_digest, MAX_RECORDED_RANGES)
            ranges.clear()
            self.ranges = None

    def _note_read(self, spans: range, start: int, end: int, header: bool) -> bool:
        """Count a read; True if it is file data's first read of a span that a tar header check
        missed and fetched (the file's own first miss, taken early by its lookup). A span the
        recorded prefetch or read-ahead brought in is no miss: its first read plans nothing."""
        with self._lock:
            if self.first_read_at is None:
                self.first_read_at = time.time()
            after_header = not header and any(
                i in self._header_missed and i not in self._read_data for i in spans)
            (self._read_header if header else self._read_data).update(spans)
            self._order.update(dict.fromkeys(spans))
            if self._header_ahead:
                self._header_ahead.difference_update(spans)
            if self.ranges is not None:
                self._record_range(start, end)
            self.stats.read_bytes += end - start
            if not header:
                for i in spans:
                    self._mark_read(i)
        return after_header

    def _mark_read(self, i: int) -> None:
        """Tell the span cache's other readers (the FUSE session holder) that reads of span i need
        nothing more from here: file data read it, and no read-ahead waits for its first read
        (lock held)."""
        if i in self._read_data and i not in self._ahead:
            self.cache.mark_read(i)

    def _plan_read_ahead(self, spans: range | list[int], until: int | None = None,
                         touched: bool = False) -> list[int]:
        """The spans to read ahead of a read that misses the cache or first touches a read-ahead
        span (or `touched`: a span a header check fetched), none starting at or past `until`."""
        if not spans:
            return []
        share = READ_AHEAD_FIRST          # a miss: the first window is small; a reader that goes on grows it
        if self._ahead:
            with self._lock:
                for i in spans:
                    if i in self._ahead and i not in self._inflight:
                        share = min(share, self._ahead.pop(i))
                        self._mark_read(i)
                        touched = True
        if not touched and all(self.cache.has(i) for i in spans):
            return []
        if self.recorded and all(i in self.recorded for i in spans):
            share = 1                     # on a recorded path the recording says what comes (_off_record)
        budget, inflated = READ_AHEAD_BYTES // share, READ_AHEAD_INFLATED // share
        past_file = NEIGHBOR_BYTES
        most = NEIGHBOR_SPANS if self._neighbors else max(READ_AHEAD_SPANS // share, 1)
        want: list[int] = []
        first_neighbor = None             # the first span past the file read (the next files')
        for j in range(spans[-1] + 1, min(spans[-1] + 1 + most, self.ztoc.num_spans)):
            c0, c1 = self.ztoc.span_compressed_range(j)
            if until is not None and self.ztoc.span_uncompressed_range(j)[0] >= until:
                # past the file read: only the next files' small chunks, NEIGHBOR_BYTES in all
                past_file -= c1 - c0
                if not self._neighbors or c1 - c0 > NEIGHBOR_SPAN_BYTES or past_file < 0:
                    break
                if first_neighbor is None:
                    first_neighbor = j
            budget -= c1 - c0
            inflated -= self._inflated(j)
            if inflated < 0 or budget < 0 and want:
                break
            want.append(j)
        claimed = self._claim_ahead(self._off_record(spans, want), max(share // 2, 1))
        if first_neighbor is not None:
            with self._lock:
                self._neighbor_spans.update(j for j in claimed if j >= first_neighbor)
        return claimed

    def _plan_header_read_ahead(self, spans: range) -> list[int]:
        """The spans to fetch beside a tar header check that misses the cache: of the next
        HEADER_READ_AHEAD spans of the layer, those holding the headers of at least HEADER_DENSE
        entries, which the next lookups are likely to need (a tar keeps a directory's entries
        together), once the layer's header checks have missed HEADER_SCAN spans. A span inside
        one large file, or of a few large ones, holds no header a lookup could want: it is never
        fetched for one. It goes on only while reads use what it brings: past its first
        HEADER_AHEAD_GRACE spans, at least one in HEADER_AHEAD_USE of them touched. A workload
        that takes a few packages of a directory of many (node_modules) looks its next name up
        far away, and the next spans would be of packages no read wants."""
        if not spans or not HEADER_READ_AHEAD or all(self.cache.has(i) for i in spans):
            return []
        with self._lock:
            used = self._header_ahead_sent - len(self._header_ahead)
            if len(self._header_missed) < HEADER_SCAN or \
                    self._header_ahead_sent - HEADER_AHEAD_GRACE > HEADER_AHEAD_USE * used:
                return []
        want = [j for j in range(spans[-1] + 1, min(spans[-1] + 1 + HEADER_READ_AHEAD, self.ztoc.num_spans))
                if self._inflated(j) <= READ_AHEAD_INFLATED and self._entries_in(j) >= HEADER_DENSE]
        claimed = self._claim_ahead(self._off_record(spans, want))
        with self._lock:
            fresh = [j for j in claimed if j not in self._header_ahead]    # (one claimed again after a failure)
            self._header_ahead.update(fresh)
            self._header_ahead_sent += len(fresh)
        return claimed

    def _entries_in(self, i: int) -> int:
        """How many entries have their data (so their header) start in span i: two binary searches
        over the entries, which an index keeps in stream order (if one does not, this only
        misjudges a read-ahead)."""
        s0, s1 = self.ztoc.span_uncompressed_range(i)
        return self._first_entry_from(s1 + 1) - self._first_entry_from(s0 + 1)

    def _first_entry_from(self, pos: int) -> int:
        """The index of the first entry whose data starts at or after `pos` (binary search)."""
        lo, hi = 0, len(self.ztoc)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.ztoc.entry_extent(mid)[0] < pos:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _submit_read_ahead(self, spans: list[int]) -> int:
        """Queue claimed read-ahead spans, adjacent ones in a request: READ_AHEAD_RUN of them, or
        more while they hold under RUN_BYTES compressed (small chunks: a request each would cost a
        round trip each); returns how many spans were queued."""
        runs: list[list[int]] = []
        held = 0
        for i in sorted(spans):
            c0, c1 = self.ztoc.span_compressed_range(i)
            run = runs[-1] if runs else None
            if run is not None and run[-1] == i - 1 and len(run) < MAX_SPANS_PER_REQUEST and \
                    (len(run) < READ_AHEAD_RUN or held + c1 - c0 <= RUN_BYTES):
                run.append(i)
                held += c1 - c0
            else:
                runs.append([i])
                held = c1 - c0
        return self._submit_runs(runs)

    def _submit_runs(self, runs: list[list[int]]) -> int:
        """Queue runs of claimed read-ahead spans, a request each, in their order; returns how
        many spans were queued (a full queue drops the rest, unclaimed)."""
        queued = 0
        for run in runs:
            def job(run: list[int] = run) -> None:
                try:
                    self.ensure(run, background=True)
                except Exception as e:   # only a read-ahead: the read that needs it will report it
                    log.warning("layer %s: read-ahead of spans %s failed: %s", self.layer_digest, run, e)
                    with self._lock:
                        for j in run:
                            self._ahead.pop(j, None)

            if _POOL.submit(job):
                queued += len(run)
            else:
                with self._lock:
                    for j in run:
                        self._ahead.pop(j, None)
        return queued

    def ensure(self, spans: range | list[int], background: bool = False,
               on_transfer: Callable[[], object] | None = None,
               longest: int = MAX_SPANS_PER_REQUEST) -> dict[int, bytes]:
        """Make `spans` cached; returns the bytes of those this call (or a waited-on fetch) produced.

        `on_transfer` runs once the bytes this call fetches have arrived (at once if it fetches none).
        Adjacent spans go in one range, at most `longest` of them and MAX_REQUEST_BYTES held; with
        `fetch_ranges`, up to MAX_RANGES_PER_REQUEST such ranges go in one request, within the same
        bytes held (`multi_range`)."""
        claimed: dict[int, Future] = {}
        waiting: dict[int, Future] = {}
        with self._lock:
            self._refuse_recent_failures(spans)
            for i in spans:
                if self.cache.has(i):
                    continue
                fut = self._inflight.get(i)
                if fut is not None:
                    waiting[i] = fut
                else:
                    fut = Future()
                    self._inflight[i] = fut
                    claimed[i] = fut
        if not background and claimed:
            self.last_demand = time.monotonic()
        if on_transfer is not None and not claimed:
            on_transfer()
            on_transfer = None
        results: dict[int, bytes] = {}
        try:
            for batch in self._batches(_runs(claimed, longest, self._held, MAX_REQUEST_BYTES)):
                results.update(self._fetch_batch(batch, on_transfer))
                on_transfer = None
        finally:
            # Whatever happened, release every claim so waiters never hang. A resolved claim stays
            # until the writer has stored it (_stored); a failed one goes now.
            with self._lock:
                for i, fut in claimed.items():
                    if not fut.done():
                        fut.set_exception(LazyociError(f"span {i} of {self.layer_digest} was not fetched"))
                    if fut.exception() is not None and self._inflight.get(i) is fut:
                        del self._inflight[i]
        for i, fut in waiting.items():
            results[i] = fut.result()      # re-raises the fetcher's IntegrityError/RegistryError
        return results

    # -- internals -----------------------------------------------------------

    def _inflated(self, i: int) -> int:
        u0, u1 = self.ztoc.span_uncompressed_range(i)
        return u1 - u0

    def _held(self, i: int) -> int:
        """The bytes fetching span i holds until it is handed over: compressed and inflated."""
        c0, c1 = self.ztoc.span_compressed_range(i)
        return c1 - c0 + self._inflated(i)

    @property
    def multi_range(self) -> bool:
        """Several runs of spans can go in one request (until the registry refuses that)."""
        return self.fetch_ranges is not None

    def _batches(self, runs: list[list[int]]) -> list[list[list[int]]]:
        """The runs grouped into requests: one each, or with `fetch_ranges` up to
        MAX_RANGES_PER_REQUEST runs and MAX_REQUEST_BYTES held in each."""
        if self.fetch_ranges is None or len(runs) < 2:
            return [[run] for run in runs]
        batches: list[list[list[int]]] = []
        held = 0
        for run in runs:
            n = sum(map(self._held, run))
            if batches and len(batches[-1]) < MAX_RANGES_PER_REQUEST and held + n <= MAX_REQUEST_BYTES:
                batches[-1].append(run)
                held += n
            else:
                batches.append([run])
                held = n
        return batches

    def _fetch_batch(self, batch: list[list[int]],
                     on_transfer: Callable[[], object] | None = None) -> dict[int, bytes]:
        """Fetch runs of spans in one request of several ranges, or one request per run where
        the registry does not serve that (then this fetcher asks one range at a time from now)."""
        fetch_ranges = self.fetch_ranges
        if len(batch) == 1 or fetch_ranges is None:
            out: dict[int, bytes] = {}
            for run in batch:
                out.update(self._fetch_run(run, on_transfer))
                on_transfer = None
            return out
        out = {}
        bad = self._fetch_groups(fetch_ranges, batch, out, on_transfer)
        if bad is None:
            self.fetch_ranges = None
            return self._fetch_batch(batch, on_transfer)
        self._fetch_again(bad, out)
        return out

    def _fetch_run(self, run: list[int], on_transfer: Callable[[], object] | None = None) -> dict[int, bytes]:
        """Fetch consecutive spans in one Range request, verify, decompress, cache."""
        out: dict[int, bytes] = {}
        self._fetch_again(self._fetch_group(run, 1, out, on_transfer), out)
        return out

    def _fetch_again(self, bad: list[int], out: dict[int, bytes]) -> None:
        """Spans that failed verification are fetched again on their own, up to ATTEMPTS
        requests each, then the read fails with IntegrityError."""
        for i in bad:
            for attempt in range(2, ATTEMPTS + 1):
                if not self._fetch_group([i], attempt, out):
                    break
            else:
                err = IntegrityError(
                    f"layer {self.layer_digest}: span {i} does not match its digest in the zTOC "
                    f"after {ATTEMPTS} attempts", expected=self.ztoc.span_digest(i))
                log.error("%s", err)
                self._fail(bad, err)
                raise err

    def _fetch_group(self, group: list[int], attempt: int, out: dict[int, bytes],
                     on_transfer: Callable[[], object] | None = None) -> list[int]:
        """One Range request for `group`; returns the spans that failed verification."""
        lo = self.ztoc.span_compressed_range(group[0])[0]
        hi = self.ztoc.span_compressed_range(group[-1])[1]
        asked = time.monotonic()
        if self.stream_range is not None:
            bad = self._stream_group(group, lo, hi, attempt, out, on_transfer)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("layer %s: spans %d-%d (%d bytes) in %s: %.0f ms to arrive, checked and inflated "
                          "as they came", self.layer_digest[7:19], group[0], group[-1], hi - lo,
                          threading.current_thread().name, 1000 * (time.monotonic() - asked))
            return bad
        try:
            blob = self.fetch_range(lo, hi)
        except LazyociError as e:
            self._fetch_failed(group, e)
            raise
        arrived = time.monotonic()
        if on_transfer is not None:
            on_transfer()
        self._count_request(len(blob))
        bad = self._take(group, lo, blob, attempt, out)
        if log.isEnabledFor(logging.DEBUG):   # one line per request: where a lazy start's time goes
            log.debug("layer %s: spans %d-%d (%d bytes) in %s: %.0f ms to arrive, %.0f ms to check and inflate",
                      self.layer_digest[7:19], group[0], group[-1], hi - lo, threading.current_thread().name,
                      1000 * (arrived - asked), 1000 * (time.monotonic() - arrived))
        return bad

    def _fetch_groups(self, fetch_ranges: FetchRanges, groups: list[list[int]], out: dict[int, bytes],
                      on_transfer: Callable[[], object] | None = None) -> list[int] | None:
        """One request of several ranges, a run of spans each; returns the spans that failed
        verification, or None if the registry served no such request (nothing was taken)."""
        ranges = [(self.ztoc.span_compressed_range(g[0])[0], self.ztoc.span_compressed_range(g[-1])[1])
                  for g in groups]
        asked = time.monotonic()
        try:
            blobs = fetch_ranges(ranges)
        except LazyociError as e:
            self._fetch_failed([i for g in groups for i in g], e)
            raise
        if blobs is None:
            return None
        arrived = time.monotonic()
        if on_transfer is not None:
            on_transfer()
        self._count_request(sum(map(len, blobs)))
        bad: list[int] = []
        for group, (lo, _), blob in zip(groups, ranges, blobs):
            bad += self._take(group, lo, blob, 1, out)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("layer %s: spans %s (%d bytes, %d ranges) in %s: %.0f ms to arrive, %.0f ms to check "
                      "and inflate", self.layer_digest[7:19], ",".join(f"{g[0]}-{g[-1]}" for g in groups),
                      sum(hi - lo for lo, hi in ranges), len(ranges), threading.current_thread().name,
                      1000 * (arrived - asked), 1000 * (time.monotonic() - arrived))
        return bad

    def _fetch_failed(self, spans: list[int], e: LazyociError) -> None:
        log.error("layer %s: fetching spans %d-%d failed: %s", self.layer_digest, spans[0], spans[-1], e)
        with self._lock:
            self._failed.update((i, (time.monotonic(), str(e))) for i in spans)
        self._fail(spans, e)

    def _count_request(self, received: int) -> None:
        with self._lock:
            self.stats.requests += 1
            self.stats.bytes += received
            self.stats.last_fetch = time.monotonic()

    def _take(self, group: list[int], lo: int, blob: bytes, attempt: int, out: dict[int, bytes]) -> list[int]:
        """Verify and inflate the spans of `group` out of `blob` (compressed bytes from `lo`), hand
        each to its waiters and the cache writer; returns the spans that failed verification."""
        bad: list[int] = []
        for i in group:
            c0, c1 = self.ztoc.span_compressed_range(i)
            compressed = blob[c0 - lo:c1 - lo]
            try:
                if len(compressed) != c1 - c0:
                    raise IntegrityError(f"short read ({len(compressed)} of {c1 - c0} bytes)")
                self.ztoc.verify_span(i, compressed)   # always: unverified bytes are never served
                data = self.ztoc.decompress_span(i, compressed)
            except IntegrityError as e:
                bad.append(i)
                log.error("layer %s span %d failed verification (attempt %d of %d): %s",
                          self.layer_digest, i, attempt, ATTEMPTS, e)
                continue
            except LazyociError as e:   # verified but does not inflate: the zTOC itself is wrong
                self._fail(group, e)
                raise
            self._accept(i, data, out)
        return bad

    def _stream_group(self, group: list[int], lo: int, hi: int, attempt: int, out: dict[int, bytes],
                      on_transfer: Callable[[], object] | None) -> list[int]:
        """One Range request for `group`, its bytes streamed into the spans' receivers: each span
        is verified, inflated and handed over once its last byte is in. Returns the spans that
        failed verification."""
        assert self.stream_range is not None
        taker = StreamedSpans(self.ztoc, group, lo, self.layer_digest, (attempt, ATTEMPTS),
                              lambda i, data: self._accept(i, data, out))
        try:
            self.stream_range(lo, hi, taker.begin)
        except LazyociError as e:
            taker.close()
            missing = [i for i in group if i not in taker.taken]
            if missing:
                self._fetch_failed(missing, e)
            else:       # each span was verified before the answer proved too long: they stay served
                log.error("layer %s: spans %d-%d: %s", self.layer_digest, group[0], group[-1], e)
            raise
        if on_transfer is not None:
            on_transfer()
        self._count_request(taker.received)
        if taker.error is not None:     # verified but does not inflate: the zTOC itself is wrong
            taker.close()
            self._fail(group, taker.error)
            raise taker.error
        return taker.end()

    def _accept(self, i: int, data: bytes, out: dict[int, bytes]) -> None:
        """Span i verified and inflated: count it, hand it to its waiters and the cache writer."""
        with self._lock:
            self.stats.spans += 1
            self._fetched.add(i)
        out[i] = data
        self._resolve(i, data)
        _WRITER.submit(partial(self._store, i, data), len(data))

    def _store(self, i: int, data: bytes) -> None:
        """The writer's job: put a verified span in the disk cache, then drop its claim."""
        try:
            self.cache.put(i, data)
            if self.keep_headers:
                self._keep_headers(i, data)
            if self.on_stored is not None:
                self.on_stored()
        except OSError as e:    # disk full or the like: the verified bytes still served the reads
            log.warning("layer %s: cannot cache span %d: %s", self.layer_digest, i, e)
        finally:                # stored or not, the claim goes (a later read fetches it again)
            with self._lock:
                fut = self._inflight.get(i)
                if fut is not None and fut.done() and fut.exception() is None:
                    del self._inflight[i]
                self._mark_read(i)

    def _keep_headers(self, i: int, data: bytes) -> None:
        """Keep in memory the header regions of the entries whose data starts in span i, and of
        the next entry, whose headers may begin in it (fs/header_regions.py)."""
        s0, s1 = self.ztoc.span_uncompressed_range(i)
        entries = range(self._first_entry_from(s0 + 1), min(self._first_entry_from(s1 + 1) + 1, len(self.ztoc)))
        self.cache.keep_headers(i, header_regions.cut(self.ztoc, i, data, entries))

    def _refuse_recent_failures(self, spans: range | list[int]) -> None:
        """LazyociError if a span not on its way failed to fetch moments ago (lock held)."""
        if not self._failed:
            return
        now = time.monotonic()
        for i in spans:
            failed = self._failed.get(i)
            if failed is not None and now - failed[0] < RECENT_FAILURE_SECONDS and i not in self._inflight:
                raise LazyociError(f"layer {self.layer_digest}: span {i} failed {now - failed[0]:.1f}s ago "
                                   f"and is not asked for again yet: {failed[1]}")

    def _resolve(self, i: int, data: bytes) -> None:
        with self._lock:
            self._failed.pop(i, None)
            fut = self._inflight.get(i)
        if fut is not None and not fut.done():
            fut.set_result(data)

    def _fail(self, spans: list[int], exc: BaseException) -> None:
        with self._lock:
            futs = [self._inflight.get(i) for i in spans]
        for fut in futs:
            if fut is not None and not fut.done():
                fut.set_exception(exc)


def _runs(spans: Iterable[int], longest: int, size: Callable[[int], int] | None = None,
          most_bytes: int = 0) -> list[list[int]]:
    """Group sorted span indices into runs of consecutive ones: at most `longest` each and, with
    `size`, at most `most_bytes` of size(i) each (a larger span makes a run alone)."""
    runs: list[list[int]] = []
    held = 0
    for i in sorted(spans):
        n = size(i) if size is not None else 0
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < longest and \
                (size is None or held + n <= most_bytes):
            runs[-1].append(i)
            held += n
        else:
            runs.append([i])
            held = n
    return runs
