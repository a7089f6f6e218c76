"""The span manager's helper threads: a read-ahead pool and the cache writer.

Both are daemon threads started on first use, so neither ever holds up the
service's exit; the writer is flushed explicitly before a span cache closes.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

log = logging.getLogger(__name__)


class ReadAheadPool:
    """Daemon threads fetching queued spans (a read-ahead never holds up the service's exit)."""

    def __init__(self, workers: int, depth: int) -> None:
        self._jobs: queue.Queue = queue.Queue(depth)
        self._workers = workers
        self._started = False
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> bool:
        with self._lock:
            if not self._started:
                for n in range(self._workers):
                    threading.Thread(target=self._run, name=f"lazyoci-readahead-{n}", daemon=True).start()
                self._started = True
        try:
            self._jobs.put_nowait(job)
            return True
        except queue.Full:
            return False

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:       # a job logs its own errors; never let the worker die
                log.exception("read-ahead job failed")


class WriteBehind:
    """One daemon thread storing verified spans in the disk cache, in the order they came."""

    def __init__(self, depth: int) -> None:
        self._jobs: queue.Queue = queue.Queue(depth)   # full: the fetching thread waits (backpressure)
        self._lock = threading.Lock()
        self._started = False

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if not self._started:
                threading.Thread(target=self._run, name="lazyoci-cache-writer", daemon=True).start()
                self._started = True
        self._jobs.put(job)

    def flush(self) -> None:
        """Wait until every span handed over so far is stored (before a cache is closed)."""
        if self._started:
            self._jobs.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:
                log.exception("cache write failed")
            finally:
                self._jobs.task_done()
