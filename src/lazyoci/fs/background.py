"""The background fetcher: completes lazy layers so containers stop needing the registry.

After a layer has been quiet (no on-demand fetch, and mounted) for
`soci.background_quiet_seconds`, one missing span is fetched every
`soci.background_interval_ms`, layer by layer, through the same span manager
as reads — so a span is still never fetched twice and always verified.
A failing span is skipped for this round and retried later; errors are logged.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

from lazyoci.errors import LazyociError
from lazyoci.fs.span_fetcher import SpanFetcher

log = logging.getLogger(__name__)


class BackgroundFetcher:
    """A daemon thread that fills the span caches of mounted layers at a bounded rate."""

    def __init__(self, layers: Callable[[], Iterable[tuple[SpanFetcher, float]]],
                 quiet_seconds: float = 30.0, interval_ms: int = 500) -> None:
        # `layers` returns (fetcher, mounted_at monotonic time) of the mounted layers
        self._layers = layers
        self.quiet = quiet_seconds
        self.interval = max(interval_ms, 1) / 1000.0
        self._stop = threading.Event()
        self._failed: dict[tuple[str, int], float] = {}
        self._thread = threading.Thread(target=self._run, name="lazyoci-background", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _next(self) -> tuple[SpanFetcher, int] | None:
        now = time.monotonic()
        for fetcher, mounted_at in self._layers():
            if now - max(mounted_at, fetcher.last_demand) < self.quiet:
                continue
            for i in fetcher.cache.missing():
                if now - self._failed.get((fetcher.layer_digest, i), -1e9) > 60:
                    return fetcher, i
        return None

    def step(self) -> bool:
        """Fetch one span if one is due; False when nothing is left to do right now."""
        job = self._next()
        if job is None:
            return False
        fetcher, i = job
        try:
            fetcher.ensure([i], background=True)
        except LazyociError as e:
            log.warning("background fetch of span %d of %s failed: %s", i, fetcher.layer_digest, e)
            self._failed[(fetcher.layer_digest, i)] = time.monotonic()
        except Exception:
            log.exception("background fetch of span %d of %s crashed", i, fetcher.layer_digest)
            self._failed[(fetcher.layer_digest, i)] = time.monotonic()
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.step()
            self._stop.wait(self.interval if busy else max(self.interval, 1.0))
