"""The span manager's helper threads: a read-ahead pool and the cache writer.

Both are daemon threads started on first use, so neither ever holds up the
service's exit; the writer is flushed explicitly before a span cache closes.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from typing import Callable

from lazyoci.libc import name_this_thread

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
        name_this_thread()
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:       # a job logs its own errors; never let the worker die
                log.exception("read-ahead job failed")


class WriteBehind:
    """One daemon thread storing verified spans in the disk cache, in the order they came.

    The spans waiting for it are bounded in bytes, not in count: a full queue makes the fetching
    thread wait (backpressure), so memory stays bounded whatever span size an index declares.
    A span larger than the whole bound still goes through, alone."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._jobs: deque[tuple[Callable[[], None], int]] = deque()
        self._queued = 0               # bytes of the spans in _jobs and the one being stored
        self._busy = 0                 # jobs handed over and not finished
        self._cond = threading.Condition()
        self._started = False

    def submit(self, job: Callable[[], None], nbytes: int) -> None:
        """Queue `job` (which stores `nbytes` of verified span); waits while the queue is full."""
        with self._cond:
            if not self._started:
                threading.Thread(target=self._run, name="lazyoci-cache-writer", daemon=True).start()
                self._started = True
            while self._queued and self._queued + nbytes > self.max_bytes:
                self._cond.wait()
            self._jobs.append((job, nbytes))
            self._queued += nbytes
            self._busy += 1
            self._cond.notify_all()

    @property
    def queued_bytes(self) -> int:
        """Bytes of spans handed over and not stored yet."""
        return self._queued

    def flush(self) -> None:
        """Wait until every span handed over so far is stored (before a cache is closed)."""
        with self._cond:
            while self._busy:
                self._cond.wait()

    def _run(self) -> None:
        name_this_thread()
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job, nbytes = self._jobs.popleft()
            try:
                job()
            except Exception:
                log.exception("cache write failed")
            finally:
                with self._cond:
                    self._queued -= nbytes
                    self._busy -= 1
                    self._cond.notify_all()
