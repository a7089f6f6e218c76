"""Recorded prefetch: fetch a layer's listed spans at mount, in parallel, coalesced, bounded.

The spans come from the layer's prefetch artifact (soci/prefetch.py), in its order. Each run of
consecutive spans (at most PREFETCH_RUN) is one Range request; PREFETCH_WORKERS requests are in
flight at once. Everything goes through the span manager, so a span a read already fetches is
waited on rather than fetched again, and every span is verified before anything uses it; a read
of a span that is still queued here fetches it itself (then this finds it cached). A failed
request is logged and counted: prefetch only speeds reads up, the reads report their errors.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from lazyoci.fs.span_fetcher import SpanFetcher

log = logging.getLogger(__name__)

PREFETCH_WORKERS = 4          # Range requests in flight for one layer's prefetch
PREFETCH_RUN = 8              # spans per request at most (the span manager also bounds its bytes)


@dataclass(frozen=True)
class PrefetchProgress:
    """Shown by `service status`."""

    spans: int                # spans the artifact names
    done: int                 # of those, cached or fetched by now (by the prefetch or by reads)
    failed: int               # spans whose request failed
    finished: bool


class SpanPrefetch:
    """One layer's prefetch, run by daemon threads (never holding up the service's exit)."""

    def __init__(self, fetcher: SpanFetcher, spans: list[int], workers: int = PREFETCH_WORKERS,
                 run: int = PREFETCH_RUN) -> None:
        self.fetcher = fetcher
        self.spans = spans
        self._jobs = _runs_in_order(spans, run)
        self._workers = max(1, min(workers, len(self._jobs)))
        self._lock = threading.Lock()
        self._next = 0
        self._done = 0
        self._failed = 0
        self._running = 0

    def start(self) -> None:
        self._running = self._workers
        for n in range(self._workers):
            threading.Thread(target=self._work, name=f"lazyoci-prefetch-{n}", daemon=True).start()

    def progress(self) -> PrefetchProgress:
        with self._lock:
            return PrefetchProgress(len(self.spans), self._done, self._failed, self._running == 0)

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._next >= len(self._jobs):
                    self._running -= 1
                    return
                job = self._jobs[self._next]
                self._next += 1
            try:
                self.fetcher.ensure(job, background=True)
                ok = True
            except Exception as e:      # only a prefetch: the read that needs the span reports it
                log.warning("layer %s: prefetch of spans %d-%d failed: %s", self.fetcher.layer_digest,
                            job[0], job[-1], e)
                ok = False
            with self._lock:
                if ok:
                    self._done += len(job)
                else:
                    self._failed += len(job)


def _runs_in_order(spans: list[int], longest: int) -> list[list[int]]:
    """Runs of consecutive spans (at most `longest` each), in the order the list gives them."""
    runs: list[list[int]] = []
    for i in spans:
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < longest:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
