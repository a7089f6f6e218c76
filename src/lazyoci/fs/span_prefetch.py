"""Recorded prefetch: fetch a layer's listed spans at mount, in parallel, coalesced, bounded.

The spans come from the layer's prefetch artifact (soci/prefetch.py), in its order. Where the
registry serves several ranges in one request, each request takes the next spans of the list up
to PREFETCH_REQUEST_BYTES compressed, adjacent ones in one range (an artifact laid out around
the recorded reads has an unread span between most two it names, so runs are short: one request
per run made python-ml's 164 spans 156 requests, and a request costs a round trip and the
registry's work); else each run of consecutive spans (at most PREFETCH_RUN) is one Range
request. One set of PREFETCH_REQUESTS threads serves the prefetches of every mounted layer, a
request from each layer in turn: an image mounts several layers at once, and a bound per layer
multiplied the requests in flight with the layers, which took the link from the pull still
fetching the next layers' indexes and held that many spans in memory. Everything goes through
the span manager, so a span a read already fetches is waited on rather than fetched again, and
every span is verified before anything uses it; a read of a span that is still queued here
fetches it itself (then this finds it cached). A failed request is logged and counted: prefetch
only speeds reads up, the reads report their errors.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

from lazyoci.fs.span_fetcher import SpanFetcher
from lazyoci.libc import name_this_thread

log = logging.getLogger(__name__)

PREFETCH_REQUESTS = 4         # Range requests in flight for the prefetches of all layers together
PREFETCH_RUN = 4              # spans per request at most (the span manager also bounds its bytes) ...
PREFETCH_REQUEST_BYTES = 2 << 20   # ... or, several ranges in a request, compressed bytes (a span more
                                   # at most; never fewer than one span)


@dataclass(frozen=True)
class PrefetchProgress:
    """Shown by `service status`."""

    spans: int                # spans the artifact names
    done: int                 # of those, cached or fetched by now (by the prefetch or by reads)
    failed: int               # spans whose request failed
    finished: bool


class SpanPrefetch:
    """One layer's prefetch; its requests are made by the threads all prefetches share."""

    def __init__(self, fetcher: SpanFetcher, spans: list[int], run: int = PREFETCH_RUN,
                 scheduler: "PrefetchScheduler | None" = None,
                 request_bytes: int = PREFETCH_REQUEST_BYTES) -> None:
        self.fetcher = fetcher
        self.spans = spans
        self._run = run
        self._request_bytes = request_bytes
        self._scheduler = scheduler or _SCHEDULER
        self._lock = threading.Lock()
        self._next = 0            # spans of the list taken into requests so far
        self._running = 0         # requests taken and not ended
        self._done = 0
        self._failed = 0

    def start(self) -> None:
        if self.spans:
            self._scheduler.add(self)

    def progress(self) -> PrefetchProgress:
        with self._lock:
            return PrefetchProgress(len(self.spans), self._done, self._failed,
                                    self._next >= len(self.spans) and not self._running)

    def take(self) -> list[int] | None:
        """The spans of the next request to make, or None once every one has been taken: the
        next spans of the list up to `request_bytes` where the fetcher sends several ranges in a
        request, else the next run of consecutive spans."""
        with self._lock:
            spans, start = self.spans, self._next
            if start >= len(spans):
                return None
            end = start + 1
            if self.fetcher.multi_range:
                budget = self._request_bytes - _compressed(self.fetcher, spans[start])
                while end < len(spans) and budget > 0:
                    budget -= _compressed(self.fetcher, spans[end])
                    end += 1
            else:
                while end < len(spans) and end - start < self._run and spans[end] == spans[end - 1] + 1:
                    end += 1
            self._next = end
            self._running += 1
            return spans[start:end]

    def run(self, job: list[int]) -> None:
        """Make one request (through the span manager) and count what it did."""
        try:
            self.fetcher.ensure(job, background=True)
            ok = True
        except Exception as e:      # only a prefetch: the read that needs the span reports it
            log.warning("layer %s: prefetch of spans %s failed: %s", self.fetcher.layer_digest,
                        ",".join(map(str, job)), e)
            ok = False
        with self._lock:
            self._running -= 1
            if ok:
                self._done += len(job)
            else:
                self._failed += len(job)


def _compressed(fetcher: SpanFetcher, span: int) -> int:
    c0, c1 = fetcher.ztoc.span_compressed_range(span)
    return c1 - c0


class PrefetchScheduler:
    """Daemon threads (started on first use) making the requests of every queued prefetch, one
    request of each in turn, at most `workers` at once."""

    def __init__(self, workers: int = PREFETCH_REQUESTS) -> None:
        self._workers = workers
        self._queue: deque[SpanPrefetch] = deque()
        self._cond = threading.Condition()
        self._started = False

    def add(self, prefetch: SpanPrefetch) -> None:
        with self._cond:
            if not self._started:
                for n in range(self._workers):
                    threading.Thread(target=self._work, name=f"lazyoci-prefetch-{n}", daemon=True).start()
                self._started = True
            self._queue.append(prefetch)
            self._cond.notify()

    def _next(self) -> tuple[SpanPrefetch, list[int]]:
        with self._cond:
            while True:
                while self._queue:
                    prefetch = self._queue.popleft()
                    job = prefetch.take()
                    if job is not None:
                        self._queue.append(prefetch)      # its next request after the others' turn
                        return prefetch, job
                self._cond.wait()

    def _work(self) -> None:
        name_this_thread()
        while True:
            prefetch, job = self._next()
            prefetch.run(job)


_SCHEDULER = PrefetchScheduler()
