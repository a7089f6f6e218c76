"""The background fetcher: completes lazy layers so containers stop needing the registry.

After a layer has been quiet (no on-demand fetch, and mounted) for
`soci.background_quiet_seconds`, its missing spans are fetched layer by layer,
on average one every `soci.background_interval_ms`, through the same span
manager as reads — so a span is still never fetched twice and always verified.
Adjacent missing spans go in one Range request (up to BACKGROUND_RUN of them),
and the fetcher then rests one interval per span it fetched: the same average
rate as one span a request, without a round trip per span.
A failing span is skipped for this round and retried later; errors are logged.

`on_start` runs when the fetcher first takes a layer on: the service starts the layer's
whole-layer tar check then, reading through `read_as_fetched`, which waits for the spans
this fetcher brings instead of fetching them itself (the check would otherwise start once
the last span is in and keep the CPU busy just when containers start from the complete
layer; it costs a second of CPU for a big layer, the network gives it that time now).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Callable, Iterable

from lazyoci.errors import LazyociError
from lazyoci.fs.span_fetcher import SpanFetcher
from lazyoci.libc import name_this_thread

log = logging.getLogger(__name__)

BACKGROUND_RUN = 8              # adjacent spans per background request ...
BACKGROUND_RUN_BYTES = 64 << 20  # ... and their compressed + inflated bytes (a larger span goes alone)


class BackgroundFetcher:
    """A daemon thread that fills the span caches of mounted layers at a bounded rate."""

    def __init__(self, layers: Callable[[], Iterable[tuple[SpanFetcher, float]]],
                 quiet_seconds: float = 30.0, interval_ms: int = 500,
                 on_start: Callable[[SpanFetcher], None] | None = None) -> None:
        # `layers` returns (fetcher, mounted_at monotonic time) of the mounted layers
        self._layers = layers
        self._on_start = on_start
        self._started: weakref.WeakSet[SpanFetcher] = weakref.WeakSet()     # the fetchers taken on
        self.quiet = quiet_seconds
        self.interval = max(interval_ms, 1) / 1000.0
        self._stop = threading.Event()
        self._failed: dict[tuple[str, int], float] = {}
        self._thread = threading.Thread(target=self._run, name="lazyoci-background", daemon=True)
        self._last_run = 0                  # spans the last step fetched (its rest is one interval each)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _next(self) -> tuple[SpanFetcher, list[int]] | None:
        """The first quiet layer's first due missing span and the due missing spans right after it."""
        now = time.monotonic()
        for fetcher, mounted_at in self._layers():
            if now - max(mounted_at, fetcher.last_demand) < self.quiet:
                continue
            run: list[int] = []
            held = 0
            for i in fetcher.cache.missing():
                size = _held(fetcher, i)
                if run and (i != run[-1] + 1 or len(run) == BACKGROUND_RUN or held + size > BACKGROUND_RUN_BYTES):
                    break
                if now - self._failed.get((fetcher.layer_digest, i), -1e9) > 60:
                    run.append(i)
                    held += size
                elif run:
                    break
            if run:
                return fetcher, run
        return None

    def step(self) -> bool:
        """Fetch one run of spans if one is due; False when nothing is left to do right now."""
        self._last_run = 0
        job = self._next()
        if job is None:
            return False
        fetcher, run = job
        self._last_run = len(run)
        if self._on_start is not None and fetcher not in self._started:
            self._started.add(fetcher)
            try:
                self._on_start(fetcher)
            except Exception:
                log.exception("starting the work that follows the background fetch of %s failed",
                              fetcher.layer_digest)
        try:
            fetcher.ensure(run, background=True, longest=BACKGROUND_RUN)
        except LazyociError as e:
            log.warning("background fetch of spans %d-%d of %s failed: %s", run[0], run[-1],
                        fetcher.layer_digest, e)
            self._skip_missing(fetcher, run)
        except Exception:
            log.exception("background fetch of spans %d-%d of %s crashed", run[0], run[-1], fetcher.layer_digest)
            self._skip_missing(fetcher, run)
        return True

    def _skip_missing(self, fetcher: SpanFetcher, run: list[int]) -> None:
        """Leave the spans of a failed run that are still missing for a minute (those before the
        failing one may have been stored)."""
        missing = set(fetcher.cache.missing())
        failed_at = time.monotonic()
        for i in run:
            if i in missing:
                self._failed[(fetcher.layer_digest, i)] = failed_at

    def _run(self) -> None:
        name_this_thread()
        while not self._stop.is_set():
            busy = self.step()
            self._stop.wait(self.interval * self._last_run if busy else max(self.interval, 1.0))


def read_as_fetched(fetcher: SpanFetcher, poll_seconds: float = 0.05) -> Callable[[int, int], bytes]:
    """A reader of the layer's verified tar stream that waits until the spans of a range are in
    the disk cache (brought by the background fetcher, or by reads), then reads them without
    counting a read. LazyociError once the layer's cache is closed (the view was unmounted)."""
    def read(start: int, end: int) -> bytes:
        spans = fetcher.ztoc.spans_for(start, end)
        while not all(fetcher.cache.has(i) for i in spans):
            if fetcher.cache.closed:
                raise LazyociError(f"layer {fetcher.layer_digest} is no longer served")
            time.sleep(poll_seconds)
        return fetcher.read(start, end, background=True)
    return read


def _held(fetcher: SpanFetcher, i: int) -> int:
    """What fetching span i holds in memory until it is stored: its compressed and inflated bytes."""
    c0, c1 = fetcher.ztoc.span_compressed_range(i)
    u0, u1 = fetcher.ztoc.span_uncompressed_range(i)
    return (c1 - c0) + (u1 - u0)
