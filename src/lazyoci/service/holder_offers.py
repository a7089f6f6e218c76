"""The service's side of READs answered by the FUSE session holder (service/holder_reads.py).

A view is handed to the holder once nothing about serving its files can change: every span
is in the disk cache and every tar header matched its index (or its format's index needs no
such check). Before that, and for whatever the holder is not given, READs go to the service
as before. Everything the service does to a handed-over layer's cached bytes (eviction, purge)
or to the view (unmount) takes it back first, and waits for the holder to say so: the offer
and the taking back hold one lock, so no offer slips in between a take-back and the change.

Offers are made by one worker thread (the file extents of a big layer take a fifth of a
second to decode) and only while this service is attached to the holder: offers asked for
before that wait, since the holder drops everything when the service before detaches.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from lazyoci.errors import LazyociError
from lazyoci.fs import tree as T
from lazyoci.fs.layer_fs import LazyLayer
from lazyoci.service.holder_link import HolderPaths, serve_reads, withdraw_reads
from lazyoci.service.holder_reads import EXTENT_TYPECODE

__all__ = ["HolderOffers", "file_extents"]

log = logging.getLogger(__name__)


def file_extents(layer: LazyLayer) -> array:
    """Two integers per node of the layer's tree: where a regular file's data lies in the tar
    stream and its size; size -1 for every other node (the holder leaves those to the service).
    A hardlink's name gets -1 too: the kernel knows it by its target's node ID."""
    t = layer.tree
    out = array(EXTENT_TYPECODE, [0, -1]) * len(t)
    index = t.index
    for n in range(len(t)):
        if t.kind[n] == T.REG and t.target[n] == n and t.entry[n] >= 0:
            out[2 * n], out[2 * n + 1] = index.entry_extent(t.entry[n])
    return out


class HolderOffers:
    """Hands complete, checked views to the holder and takes them back."""

    def __init__(self, paths: HolderPaths, slot_of: Callable[[LazyLayer], int | None]) -> None:
        self._paths = paths
        self._slot_of = slot_of
        self._lock = threading.Lock()          # offers and take-backs, one at a time
        self._attached = False
        self._waiting: dict[Path, LazyLayer] = {}        # asked for before this service attached
        self._served: dict[Path, int] = {}                # cache directory -> slot the holder serves
        self._queue: queue.SimpleQueue[LazyLayer | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    # -- asking ------------------------------------------------------------------

    def offer(self, layer: LazyLayer) -> None:
        """Hand the view over if it is complete and checked (soon, in the worker thread)."""
        if not _ready(layer):
            return
        with self._lock:
            if layer.fetcher.cache.directory in self._served:
                return
            if not self._attached:
                self._waiting[layer.fetcher.cache.directory] = layer
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="holder-offers", daemon=True)
                self._thread.start()
        self._queue.put(layer)

    def attached(self) -> None:
        """This service now serves the holder's session: make the offers that waited for it."""
        with self._lock:
            self._attached = True
            waiting = list(self._waiting.values())
            self._waiting.clear()
        for layer in waiting:
            self.offer(layer)

    def withdraw(self, layer: LazyLayer) -> None:
        """Take the view back (before it is unmounted); ServiceError if the holder cannot be told."""
        with self.changing(layer.fetcher.cache.directory):
            pass

    @contextmanager
    def changing(self, directory: Path) -> Iterator[None]:
        """While the cached bytes under `directory` change: the holder reads none of them."""
        with self._lock:
            self._waiting.pop(directory, None)
            slot = self._served.get(directory)
            if slot is not None:
                withdraw_reads(self._paths, slot)      # raises if not taken back: nothing changes then
                del self._served[directory]
                log.info("the FUSE session holder no longer reads layer %s", directory.name)
            yield

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)

    # -- the worker ----------------------------------------------------------------

    def _run(self) -> None:
        while (layer := self._queue.get()) is not None:
            try:
                self._hand_over(layer)
            except (LazyociError, OSError) as e:
                log.warning("layer %s: READs stay with the service: %s", layer.digest, e)
            except Exception:
                log.exception("layer %s: handing READs to the FUSE session holder failed", layer.digest)

    def _hand_over(self, layer: LazyLayer) -> None:
        cache = layer.fetcher.cache
        extents = file_extents(layer)
        with self._lock:
            slot = self._slot_of(layer)
            if slot is None or cache.directory in self._served or not _ready(layer):
                return       # unmounted, given already, or no longer complete (evicted meanwhile)
            data_fd = os.open(cache.directory / "data", os.O_RDONLY | os.O_CLOEXEC)
            extents_fd = os.memfd_create("lazyoci-extents", os.MFD_CLOEXEC)
            try:
                raw = memoryview(extents.tobytes())
                while raw:
                    raw = raw[os.write(extents_fd, raw):]
                serve_reads(self._paths, slot, data_fd, extents_fd)
            finally:
                os.close(data_fd)
                os.close(extents_fd)
            self._served[cache.directory] = slot
        log.info("the FUSE session holder reads layer %s itself (%d files)", layer.digest,
                 sum(1 for s in extents[1::2] if s >= 0))


def _ready(layer: LazyLayer) -> bool:
    """Every span cached and verified, and nothing of the layer broken or left unchecked."""
    cache = layer.fetcher.cache
    v = layer.verifier
    return cache.cached_bytes >= cache.total_bytes and v.broken is None and v.layer_ok
