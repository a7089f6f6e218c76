"""Unpack a layer while it downloads: the pull's LayerConsumer hook of the snapshotters
that unpack (overlayfs; soci for layers without a zTOC).

The download thread calls `write(chunk)`; a worker thread of this consumer reads
the chunks from a bounded queue (so a slow disk slows the download instead of
filling memory) and applies the tar. Every layer of a pull gets its own consumer,
so layers unpack concurrently. Nothing is published before `finish()` (called
after the blob's digest was verified); `abort()` or any failure removes the
partial directory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from lazyoci.errors import LazyociError
from lazyoci.oci.manifest import Descriptor
from lazyoci.snapshot.unpack import UnpackedLayer, apply_layer_stream, remove_tree

if TYPE_CHECKING:
    from lazyoci.snapshot.layered import LayeredSnapshotter

_QUEUE_CHUNKS = 64           # at most this many chunks wait in memory per layer
_END = object()


class _Aborted(Exception):
    pass


class UnpackingConsumer:
    """A LayerConsumer (see lazyoci.images.service) that unpacks into a LayeredSnapshotter."""

    def __init__(self, snapshotter: "LayeredSnapshotter", desc: Descriptor) -> None:
        self._snap = snapshotter
        self.desc = desc
        self._staging = snapshotter.new_staging_dir()
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self._aborted = threading.Event()
        self._error: BaseException | None = None
        self._ended = False          # the worker has taken _END off the queue
        self.unpacked: UnpackedLayer | None = None
        self._thread = threading.Thread(target=self._run, name=f"unpack-{desc.digest[7:19]}", daemon=True)
        self._thread.start()

    def _chunks(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _END:
                self._ended = True
                return
            if self._aborted.is_set():
                raise _Aborted()
            yield item

    def _run(self) -> None:
        try:
            self.unpacked = apply_layer_stream(self._chunks(), self.desc.media_type, self._staging / "fs")
        except BaseException as e:  # reported to the download thread by write/finish
            self._error = e
            self._drain()

    def _drain(self) -> None:
        """Keep taking chunks after a failure so that `write` never blocks forever."""
        while not self._ended:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._aborted.is_set():
                    return
                continue
            if item is _END:
                return

    def _raise_error(self) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            if isinstance(self._error, LazyociError):
                raise self._error
            raise LazyociError(f"unpacking layer {self.desc.digest} failed: {self._error}") from self._error

    def write(self, chunk: bytes) -> None:
        self._raise_error()
        self._queue.put(bytes(chunk))

    def finish(self) -> int:
        """The blob is complete and verified: wait for the unpack, publish the layer and
        return its uncompressed size (counted by the unpack: the pull inflates once)."""
        self._queue.put(_END)
        self._thread.join()
        if self._error is not None or self.unpacked is None:
            remove_tree(self._staging)
            self._raise_error()
            raise LazyociError(f"unpacking layer {self.desc.digest} did not complete")
        self._snap.adopt_layer(self._staging, self.unpacked.diff_id, self.desc.digest)
        return self.unpacked.size

    def abort(self, exc: BaseException | None = None) -> None:
        self._aborted.set()
        try:
            self._queue.put(_END, timeout=5)
        except queue.Full:
            pass
        self._thread.join(timeout=30)
        remove_tree(self._staging)
