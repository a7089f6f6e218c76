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
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from lazyoci.errors import IntegrityError, LazyociError
from lazyoci.fs.span_cache import LayerCache

log = logging.getLogger(__name__)

FetchRange = Callable[[int, int], bytes]     # compressed blob bytes [start, end)
MAX_SPANS_PER_REQUEST = 16                   # bounds memory per request (16 x 4 MiB spans)
ATTEMPTS = 3
_READ_AHEAD = threading.BoundedSemaphore(4)   # read-aheads at once; more are skipped, not queued


@dataclass
class FetchStats:
    """What went over the network for one layer (shown by `service status`)."""

    requests: int = 0
    bytes: int = 0
    spans: int = 0
    last_fetch: float = 0.0


class SpanFetcher:
    """Serves uncompressed byte ranges of one lazy layer."""

    def __init__(self, ztoc: object, fetch_range: FetchRange, cache: LayerCache,
                 layer_digest: str, verify: bool = True) -> None:
        from lazyoci import ztoc as ztoc_mod      # C's module; imported here so fs/ loads without it

        self._decompress = ztoc_mod.decompress_span
        self._verify = ztoc_mod.verify_span
        self.ztoc = ztoc
        self.fetch_range = fetch_range
        self.cache = cache
        self.layer_digest = layer_digest
        self.verify = verify
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._inflight: dict[int, Future] = {}
        self.last_demand = 0.0                    # monotonic time of the last on-demand fetch

    # -- public --------------------------------------------------------------

    def read(self, start: int, end: int, background: bool = False) -> bytes:
        """Verified uncompressed bytes [start, end) of the layer's tar stream."""
        if end <= start:
            return b""
        for _ in range(4):   # a span evicted between fetch and read is simply fetched again
            fresh = self.ensure(self.ztoc.spans_for(start, end), background=background)
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

    def prefetch(self, span: int) -> None:
        """Fetch `span` in the background (read-ahead for a file that goes on past a read)."""
        if not 0 <= span < self.ztoc.num_spans or self.cache.has(span) or span in self._inflight:
            return

        if not _READ_AHEAD.acquire(blocking=False):
            return

        def job() -> None:
            try:
                self.ensure([span])
            except Exception as e:   # only a read-ahead: the read that needs it will report it
                log.warning("layer %s: read-ahead of span %d failed: %s", self.layer_digest, span, e)
            finally:
                _READ_AHEAD.release()

        # a daemon thread: a read-ahead never holds up the service's exit
        threading.Thread(target=job, name="lazyoci-readahead", daemon=True).start()

    def ensure(self, spans: range | list[int], background: bool = False) -> dict[int, bytes]:
        """Make `spans` cached; returns the bytes of those this call (or a waited-on fetch) produced."""
        claimed: list[int] = []
        waiting: dict[int, Future] = {}
        with self._lock:
            for i in spans:
                if self.cache.has(i):
                    continue
                fut = self._inflight.get(i)
                if fut is not None:
                    waiting[i] = fut
                else:
                    fut = Future()
                    self._inflight[i] = fut
                    claimed.append(i)
        if not background and claimed:
            self.last_demand = time.monotonic()
        results: dict[int, bytes] = {}
        try:
            for run in _runs(claimed):
                results.update(self._fetch_run(run))
        finally:
            # Whatever happened, release every claim so waiters never hang.
            with self._lock:
                for i in claimed:
                    fut = self._inflight.pop(i)
                    if not fut.done():
                        fut.set_exception(LazyociError(f"span {i} of {self.layer_digest} was not fetched"))
        for i, fut in waiting.items():
            results[i] = fut.result()      # re-raises the fetcher's IntegrityError/RegistryError
        return results

    # -- internals -----------------------------------------------------------

    def _fetch_run(self, run: list[int]) -> dict[int, bytes]:
        """Fetch consecutive spans in one Range request, verify, decompress, cache.

        Spans that fail verification are fetched again on their own, up to
        ATTEMPTS requests each, then the read fails with IntegrityError.
        """
        out: dict[int, bytes] = {}
        bad = self._fetch_group(run, 1, out)
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
        return out

    def _fetch_group(self, group: list[int], attempt: int, out: dict[int, bytes]) -> list[int]:
        """One Range request for `group`; returns the spans that failed verification."""
        lo = self.ztoc.span_compressed_range(group[0])[0]
        hi = self.ztoc.span_compressed_range(group[-1])[1]
        try:
            blob = self.fetch_range(lo, hi)
        except LazyociError as e:
            log.error("layer %s: fetching spans %d-%d failed: %s", self.layer_digest, group[0], group[-1], e)
            self._fail(group, e)
            raise
        with self._lock:
            self.stats.requests += 1
            self.stats.bytes += len(blob)
            self.stats.last_fetch = time.monotonic()
        bad: list[int] = []
        for i in group:
            c0, c1 = self.ztoc.span_compressed_range(i)
            compressed = blob[c0 - lo:c1 - lo]
            try:
                if len(compressed) != c1 - c0:
                    raise IntegrityError(f"short read ({len(compressed)} of {c1 - c0} bytes)")
                if self.verify:
                    self._verify(self.ztoc, i, compressed)
                data = self._decompress(self.ztoc, i, compressed)
            except IntegrityError as e:
                bad.append(i)
                log.error("layer %s span %d failed verification (attempt %d of %d): %s",
                          self.layer_digest, i, attempt, ATTEMPTS, e)
                continue
            except LazyociError as e:   # verified but does not inflate: the zTOC itself is wrong
                self._fail(group, e)
                raise
            try:
                self.cache.put(i, data)
            except OSError as e:    # disk full or the like: the verified bytes still serve this read
                log.warning("layer %s: cannot cache span %d: %s", self.layer_digest, i, e)
            with self._lock:
                self.stats.spans += 1
            out[i] = data
            self._resolve(i, data)
        return bad

    def _resolve(self, i: int, data: bytes) -> None:
        with self._lock:
            fut = self._inflight.get(i)
        if fut is not None and not fut.done():
            fut.set_result(data)

    def _fail(self, spans: list[int], exc: BaseException) -> None:
        with self._lock:
            futs = [self._inflight.get(i) for i in spans]
        for fut in futs:
            if fut is not None and not fut.done():
                fut.set_exception(exc)


def _runs(spans: list[int]) -> list[list[int]]:
    """Group sorted span indices into runs of consecutive ones (bounded length)."""
    runs: list[list[int]] = []
    for i in sorted(spans):
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < MAX_SPANS_PER_REQUEST:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
