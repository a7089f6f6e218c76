"""The service's side of unpacking complete layers (snapshot/cached_unpack.py) for new containers.

When every span of a zTOC view is in the span cache, its `data` file is the layer's tar: the
view is queued, and one worker thread unpacks the queued views one at a time, each in a child
process at the lowest CPU priority (the unpack is Python work: in the service it would hold
the interpreter that answers FUSE requests). The child checks the tar against the diff ID the
snapshots of the layer expect and gives them the directory; the service only says when.

A view that no snapshot waits for yet (mounted during a pull that has not committed its
snapshots, or by a direct mount) is parked and looked at again every `RECHECK_SECONDS`;
one whose snapshots have their directory already (a restarted service finds it so) is
reported unpacked at once.
Each view's state is in `service status` (`unpack`): queued, unpacking, unpacked, parked,
failed. A failure is logged and not retried by this service run: the view serves as before.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

from lazyoci.fs.layer_fs import LazyLayer
from lazyoci.libc import name_this_thread
from lazyoci.snapshot.soci import SociSnapshotter
from lazyoci.store.db import Database
from lazyoci.store.layout import DataRoot

__all__ = ["UnpackQueue", "RECHECK_SECONDS"]

log = logging.getLogger(__name__)

RECHECK_SECONDS = 10.0

QUEUED, UNPACKING, UNPACKED, PARKED, FAILED = "queued", "unpacking", "unpacked", "parked", "failed"

View = tuple[str, str]      # (layer digest, index digest)


def _whole_tar(layer: LazyLayer) -> tuple[Path, int] | None:
    """The cache file holding the view's whole uncompressed tar and its size, or None: not
    every span is cached, or the index's stream is file data without tar headers."""
    cache = layer.fetcher.cache
    if not getattr(layer.tree.index, "headers_in_stream", True) or cache.closed:
        return None
    if cache.total_bytes == 0 or cache.cached_bytes < cache.total_bytes:
        return None
    return cache.directory / "data", cache.total_bytes


class UnpackQueue:
    """Unpacks complete views for the soci snapshotter, one at a time, in child processes."""

    def __init__(self, root: DataRoot, config_path: Path | None, db: Database) -> None:
        self._root = root
        self._config_path = config_path
        self._db = db
        self._lock = threading.Lock()
        self._state: dict[View, str] = {}
        self._parked: dict[View, LazyLayer] = {}
        self._queue: queue.Queue[tuple[View, LazyLayer] | tuple[()] | None] = queue.Queue()
        self._child: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="unpack-queue", daemon=True)
        self._thread.start()

    def want(self, layer: LazyLayer) -> None:
        """Queue the view if its tar is whole in the cache and it was not taken on before."""
        if _whole_tar(layer) is None:
            return
        view = (layer.digest, layer.ztoc_digest)
        with self._lock:
            if self._closed or view in self._state:
                return
            self._state[view] = QUEUED
        self._queue.put((view, layer))

    def forget(self, layer_digest: str, ztoc_digest: str) -> None:
        """The view was unmounted: a queued or parked unpack of it no longer happens."""
        with self._lock:
            self._state.pop((layer_digest, ztoc_digest), None)
            self._parked.pop((layer_digest, ztoc_digest), None)

    def state(self, layer_digest: str, ztoc_digest: str) -> str:
        """The view's unpack state ("" when not taken on: not complete, or not a tar)."""
        with self._lock:
            return self._state.get((layer_digest, ztoc_digest), "")

    def _run(self) -> None:
        name_this_thread()
        while True:
            try:
                item = self._queue.get(timeout=RECHECK_SECONDS)
            except queue.Empty:
                item = None if self._closed else ()
            if item is None:
                return
            try:
                if item:
                    self._unpack(*item)
                else:
                    self._recheck_parked()
            except Exception:         # the database, a process: the next view is still unpacked
                log.exception("unpacking layers from the span cache")
                if item:
                    self._set(item[0], FAILED)

    def _recheck_parked(self) -> None:
        with self._lock:
            parked = list(self._parked.items())
        for view, layer in parked:
            if SociSnapshotter.waiting_diff_ids(self._db, view[0])[0]:
                with self._lock:
                    if self._parked.pop(view, None) is None:
                        continue
                    self._state[view] = QUEUED
                self._queue.put((view, layer))

    def _set(self, view: View, state: str) -> bool:
        """Move a view that is still wanted to `state`; False if it was forgotten meanwhile."""
        with self._lock:
            if view not in self._state or self._closed:
                return False
            self._state[view] = state
            return True

    def _unpack(self, view: View, layer: LazyLayer) -> None:
        tar = _whole_tar(layer)
        if tar is None:
            self.forget(*view)        # unmounted, or evicted from the cache: taken on again if complete
            return
        waiting, unpacked = SociSnapshotter.waiting_diff_ids(self._db, view[0])
        if not waiting:
            if unpacked:              # by this service before a restart, or from another view
                self._set(view, UNPACKED)
            elif self._set(view, PARKED):
                with self._lock:
                    self._parked[view] = layer
            return
        if not self._set(view, UNPACKING):
            return
        args = [sys.executable, "-m", "lazyoci.snapshot.cached_unpack", "--root", os.fspath(self._root.path),
                "--layer", view[0], "--data", os.fspath(tar[0]), "--size", str(tar[1])]
        if self._config_path is not None:
            args += ["--config", os.fspath(self._config_path)]
        try:
            with self._lock:
                if self._closed:
                    return
                self._child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE)
            out, err = self._child.communicate()
            rc = self._child.returncode
        except OSError as e:
            out, err, rc = b"", str(e).encode(), -1
        finally:
            with self._lock:
                self._child = None
        if rc == 0:
            self._set(view, UNPACKED)
            log.info("layer %s: unpacked from the span cache (%s) for new containers", view[0],
                     out.decode(errors="replace") or "no snapshot waited")
        elif self._set(view, FAILED):
            log.error("layer %s: unpacking it from the span cache failed (exit %s): %s", view[0], rc,
                      err.decode(errors="replace").strip()[-500:])

    def close(self) -> None:
        """Stop the worker; a child still unpacking is ended (its staging directory is removed by
        the next soci snapshotter made in this data root)."""
        with self._lock:
            self._closed = True
            child = self._child
        if child is not None:
            child.terminate()
        self._queue.put(None)
        self._thread.join(timeout=10)
