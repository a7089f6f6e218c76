"""The service's side of READs answered by the FUSE session holder (service/holder_reads.py).

Every view the service mounts is handed to the holder: its span cache data file, the cache's
span states and the view's read map. The holder then answers the READs that need nothing of
the service (files that passed their header check, spans read before); the others come to the
service as before. Once a view is complete and checked (every span cached, every tar
header matched its index, or its format's index needs no such check), every file's place is
written into its read map and the map is marked COMPLETE: the holder answers every READ of it.

Everything the service does to a handed-over view's cached bytes (eviction, purge) or to the
view (unmount) takes it back first, and waits for the holder to say so: the hand-over and the
taking back hold one lock, so none slips in between a take-back and the change. After an
eviction the view is handed over again, no longer COMPLETE.

Hand-overs are made by one worker thread (the places of a big layer's files take a fifth of a
second to write) and only while this service is attached to the holder: those asked for before
that wait, since the holder drops everything when the service before detaches.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from lazyoci.errors import LazyociError
from lazyoci.fs import tree as T
from lazyoci.fs.layer_fs import LazyLayer
from lazyoci.libc import name_this_thread
from lazyoci.service.holder_link import HolderPaths, serve_reads, withdraw_reads
from lazyoci.service.holder_reads import COMPLETE

__all__ = ["HolderOffers", "publish_every_file"]

log = logging.getLogger(__name__)


def publish_every_file(layer: LazyLayer) -> int:
    """Write the place of every regular file of the layer into its read map (a hardlink's name
    is left out: the kernel knows it by its target's node ID); returns how many."""
    read_map = layer.read_map
    assert read_map is not None
    t = layer.tree
    index = t.index
    files = 0
    for n in range(len(t)):
        if t.kind[n] == T.REG and t.target[n] == n and t.entry[n] >= 0:
            if not read_map.published(n):
                read_map.publish(n, *index.entry_extent(t.entry[n]))
            files += 1
    return files


class HolderOffers:
    """Hands mounted views to the holder, marks them COMPLETE when they are, and takes them back."""

    def __init__(self, paths: HolderPaths, slot_of: Callable[[LazyLayer], int | None]) -> None:
        self._paths = paths
        self._slot_of = slot_of
        self._lock = threading.Lock()          # hand-overs, take-backs and COMPLETE, one at a time
        self._attached = False
        self._layers: dict[Path, LazyLayer] = {}       # cache directory -> view offered (mounted)
        self._served: dict[Path, int] = {}              # cache directory -> slot the holder serves
        self._queue: queue.SimpleQueue[tuple[str, LazyLayer] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    # -- asking ------------------------------------------------------------------

    def offer(self, layer: LazyLayer) -> None:
        """Hand the view over (soon, in the worker thread, once this service is attached)."""
        if layer.read_map is None:
            return
        with self._lock:
            self._layers[layer.fetcher.cache.directory] = layer
            if not self._attached:
                return
        self._put("serve", layer)

    def complete(self, layer: LazyLayer) -> None:
        """Mark the view COMPLETE if it is complete and checked (soon, in the worker thread)."""
        if layer.read_map is not None and not layer.read_map.flags & COMPLETE and _ready(layer):
            self._put("complete", layer)

    def attached(self) -> None:
        """This service now serves the holder's session: make the hand-overs that waited for it."""
        with self._lock:
            self._attached = True
            waiting = list(self._layers.values())
        for layer in waiting:
            self._put("serve", layer)

    def withdraw(self, layer: LazyLayer) -> None:
        """Take the view back for good (before it is unmounted); ServiceError if the holder cannot
        be told."""
        directory = layer.fetcher.cache.directory
        with self._lock:
            self._take_back(directory)
            self._layers.pop(directory, None)

    @contextmanager
    def changing(self, directory: Path) -> Iterator[None]:
        """While the cached bytes under `directory` change: the holder reads none of them. Then the
        view, if still mounted, is handed over again (no longer COMPLETE if it is not)."""
        with self._lock:
            self._take_back(directory)
            yield
            layer = self._layers.get(directory)
            if layer is not None and layer.read_map is not None and not _ready(layer):
                layer.read_map.set_flag(COMPLETE, False)
        if layer is not None and not layer.fetcher.cache.closed:
            self._put("serve", layer)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)

    def _take_back(self, directory: Path) -> None:
        """(lock held) ServiceError if the holder cannot be told: nothing changes then."""
        slot = self._served.get(directory)
        if slot is not None:
            withdraw_reads(self._paths, slot)
            del self._served[directory]
            layer = self._layers.get(directory)
            complete = layer is not None and layer.read_map is not None and layer.read_map.flags & COMPLETE
            log.log(logging.INFO if complete else logging.DEBUG,
                    "the FUSE session holder no longer reads layer %s", directory.name)

    def _put(self, what: str, layer: LazyLayer) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="holder-offers", daemon=True)
                self._thread.start()
        self._queue.put((what, layer))

    # -- the worker ----------------------------------------------------------------

    def _run(self) -> None:
        name_this_thread()
        while (job := self._queue.get()) is not None:
            what, layer = job
            try:
                self._hand_over(layer) if what == "serve" else self._mark_complete(layer)
            except (LazyociError, OSError) as e:
                log.warning("layer %s: READs stay with the service: %s", layer.digest, e)
            except Exception:
                log.exception("layer %s: handing READs to the FUSE session holder failed", layer.digest)

    def _hand_over(self, layer: LazyLayer) -> None:
        cache, read_map = layer.fetcher.cache, layer.read_map
        assert read_map is not None
        with self._lock:
            slot = self._slot_of(layer)
            if not self._attached or slot is None or cache.directory in self._served or \
                    self._layers.get(cache.directory) is not layer or cache.closed:
                return       # not attached yet (`attached` hands it over), unmounted, or handed over already
            data_fd = os.open(cache.directory / "data", os.O_RDONLY | os.O_CLOEXEC)
            try:
                serve_reads(self._paths, slot, data_fd, cache.states_fd, read_map.fd)
            finally:
                os.close(data_fd)
            self._served[cache.directory] = slot
        log.debug("the FUSE session holder reads layer %s (slot %d) where it can", layer.digest, slot)

    def _mark_complete(self, layer: LazyLayer) -> None:
        read_map = layer.read_map
        assert read_map is not None
        if read_map.flags & COMPLETE:
            return
        files = publish_every_file(layer)
        with self._lock:
            if not _ready(layer) or self._layers.get(layer.fetcher.cache.directory) is not layer:
                return       # evicted meanwhile, or unmounted
            read_map.set_flag(COMPLETE)
        log.info("the FUSE session holder reads every file of layer %s itself (%d files)", layer.digest, files)


def _ready(layer: LazyLayer) -> bool:
    """Every span cached and verified, and nothing of the layer broken or left unchecked."""
    cache = layer.fetcher.cache
    v = layer.verifier
    return cache.cached_bytes >= cache.total_bytes and v.broken is None and v.layer_ok
