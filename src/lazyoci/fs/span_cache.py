"""Verified spans of lazy layers, cached on disk and shared by every mount of the layer.

One directory per layer and zTOC under the cache root, named as the layer's FUSE
view (`<layer hex>-<16 hex of the zTOC digest>`), so two indexes never share spans:

    data      a sparse file: the layer's UNCOMPRESSED tar bytes at their own offsets
    present   one byte per span (1 = that span's bytes in `data` were verified)
    meta      the zTOC digest and span count the bitmap belongs to
    headers-checked   present once the whole-layer check of the tar against the zTOC passed
    entries-checked   one byte per zTOC entry: what its header check found (fs/header_check.py),
              so a new service process (a restart, a second image with the layer) checks no
              entry again; a check's result is fixed by the layer and zTOC digests, as the tar is
              (EntryStates)

Memory: a span's bytes leave the page cache once they are on disk and PAGES_KEPT_BYTES of newer
spans have been written after them, if a read has touched the span by then (SPAN_READ); a span
no read has touched then stays until PAGES_UNREAD_BYTES of such spans have followed it. A workload's
reads land in the FUSE file's own page cache, so the span cache's copy would hold every byte a
second time, and a large lazy start writes hundreds of MB: new memory that, on a virtual machine
whose balloon takes free memory back from the guest, costs a fault into the host for each page
(bench/README.md: 0.7-2.9 s of the cache writer's system CPU in a python-ml start, 0.2-0.5 s
with the pages dropped, as each write reuses pages an older span gave back). But a span dropped
before its first read costs that memory all the same, and the disk besides: the read brings
its pages back. A recorded prefetch runs far ahead of the workload (python-ml's optimized start
writes 250 MB of spans, nearly all of which it reads within seconds), so its spans wait for their
reads; read-ahead that no read touches goes once the unread spans pass their bound. Later reads
of a dropped span (the session holder's, complete-layer unpacks) come from disk. Header checks
read first the header bytes the span fetcher kept in memory when it stored the span
(fs/header_regions.py). Else they read a little around what they ask for (HEADER_CHUNK,
aligned), and the last HEADER_CHUNKS such chunks of all layers are kept: a directory's entries
lie together in the tar, so the checks of its children, which a first LOOKUP in it makes at
once, find most of their headers in a chunk already read instead of reading the disk once each
(bench/README.md).

Crash safety: a span's bytes are written and fdatasync'ed BEFORE its byte in
`present` is set, and eviction clears the byte BEFORE punching the hole, so a
crash can lose a cached span but never mark unwritten (zero) bytes as present.
Because the bytes were verified against the zTOC before they were written and
the cache is root-only, a present span is served without re-hashing.

The size limit (`soci.cache_max_bytes`, 0 = none) is enforced by evicting spans
of the least recently used layers (then the far end of the current layer).

Another process may read a layer's `data` (the FUSE session holder answers READs from it:
service/holder_reads.py). It learns which spans it may read from the layer's span states, kept
in shared memory (`states_fd`): 0 not cached, SPAN_CACHED, SPAN_READ (cached, and the span
fetcher has seen its first read: `mark_read`). Whoever lets it read sets `changing`: every
eviction and purge of a layer runs inside `changing(layer directory)`, which takes the layer
back from such readers first; one that cannot be taken back is left as it is.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import threading
import time
import weakref
from collections import deque
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

from lazyoci import libc
from lazyoci.errors import LazyociError
from lazyoci.fs.header_regions import HEADER_REGIONS, Pieces
from lazyoci.service.holder_reads import SPAN_CACHED, SPAN_READ
from lazyoci.service.paths import layer_view_name as _key

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Give the disk blocks of [offset, offset+length) back (reads then see zeros)."""
    try:
        libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as e:
        log.warning("cannot punch hole in span cache: %s", e.strerror)


PAGES_KEPT_BYTES = 64 << 20     # the newest spans written stay in the page cache ...
PAGES_UNREAD_BYTES = 256 << 20  # ... and, past them, up to this many no read had touched (the module docstring)
HEADER_CHUNK = 64 << 10         # what a header check's read brings in at once ...
HEADER_CHUNKS = 32              # ... and how many of those are kept, of all layers (the module docstring)


class _WrittenPages:
    """The spans whose pages are kept (the module docstring): a window of the last `keep` bytes
    written, and past it, oldest first, the spans no read had touched when they left it, `unread`
    bytes at most (one read since does not keep them longer: the bound is what matters)."""

    def __init__(self, keep: int, unread: int) -> None:
        self.keep = keep
        self.unread = unread
        self._lock = threading.Lock()
        self._window: deque[tuple[LayerCache, int]] = deque()     # (cache, span), oldest first
        self._window_bytes = 0
        self._unread: deque[tuple[LayerCache, int]] = deque()
        self._unread_bytes = 0

    def written(self, cache: LayerCache, span: int) -> None:
        """A span was written and synced: drop the pages of those it pushes out."""
        older = []
        with self._lock:
            self._window.append((cache, span))
            self._window_bytes += cache.span_length(span)
            while self._window_bytes > self.keep:
                item = self._window.popleft()
                length = item[0].span_length(item[1])
                self._window_bytes -= length
                if item[0].was_read(item[1]):
                    older.append(item)
                else:
                    self._unread.append(item)
                    self._unread_bytes += length
            while self._unread_bytes > self.unread:
                item = self._unread.popleft()
                self._unread_bytes -= item[0].span_length(item[1])
                older.append(item)
        for old, i in older:            # no lock held here: each takes its own cache's
            old.drop_pages(i)


_WRITTEN = _WrittenPages(PAGES_KEPT_BYTES, PAGES_UNREAD_BYTES)


class _HeaderChunks:
    """The chunks header checks read last, of every layer, HEADER_CHUNKS in all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: dict[tuple[LayerCache, int, int], bytes] = {}   # (layer, span, chunk start)

    def get(self, cache: LayerCache, span: int, chunk: int) -> bytes | None:
        with self._lock:
            return self._chunks.get((cache, span, chunk))

    def put(self, cache: LayerCache, span: int, chunk: int, data: bytes) -> None:
        with self._lock:
            self._chunks[(cache, span, chunk)] = data
            while len(self._chunks) > HEADER_CHUNKS:
                del self._chunks[next(iter(self._chunks))]      # the oldest

    def forget(self, cache: LayerCache) -> None:
        """Drop the chunks of a layer that lost spans or closed."""
        with self._lock:
            for key in [key for key in self._chunks if key[0] is cache]:
                del self._chunks[key]


_HEADER_CHUNKS = _HeaderChunks()


HEADERS_CHECKED = "headers-checked"    # marker: every tar header matched the zTOC (fs/header_check.py)
ENTRIES_CHECKED = "entries-checked"    # each zTOC entry's header check state (LayerCache.entry_states)


class EntryStates(bytearray):
    """Header check states, one byte per zTOC entry, read from a file when made and written through
    to it on every change, so that they outlive the process (another process serving the layer
    sees what it found when it starts). Reading is a bytearray's; each change costs a `pwrite`,
    or inside `held()` one `pwrite` for all the changes made in it (a directory's sweep checks
    dozens of entries at once). Written with system calls, not mapped: a write into a mapped page
    of a full disk (or of a copy-on-write filesystem) kills the process with SIGBUS, where a failed
    `pwrite` only stops the keeping (results only save time). A crash may lose results; any byte
    that reaches the disk is one a check wrote. The file's descriptor is closed with the object."""

    def __init__(self, path: Path, count: int) -> None:
        super().__init__(count)
        self._fd = -1
        self._lock = threading.Lock()
        self._holds = 0                  # `held()` blocks open, in any thread
        self._lo, self._hi = count, 0    # the entries changed inside them, not written yet
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            log.warning("header check results of %s are not kept: %s", path.parent.name, e.strerror)
            return
        weakref.finalize(self, os.close, fd)
        self._fd = fd
        try:
            if os.fstat(fd).st_size == count:
                super().__setitem__(slice(None), os.pread(fd, count, 0).ljust(count, b"\0"))
            else:                                   # another entry count: start afresh
                os.ftruncate(fd, 0)
                os.ftruncate(fd, count)
        except OSError as e:
            self._stop(e)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if self._fd < 0:
            return
        if isinstance(key, int):
            k = key % len(self)
            if self._holds:
                with self._lock:
                    if self._holds:
                        self._lo, self._hi = min(self._lo, k), max(self._hi, k + 1)
                        return
            self._write(bytes((value,)), k)
        else:
            self._write(self, 0)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Changes made inside are written when the last open block ends, together."""
        with self._lock:
            self._holds += 1
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
                lo, hi = (self._lo, self._hi) if not self._holds else (0, 0)
                if lo < hi:
                    self._lo, self._hi = len(self), 0
                    data = bytes(self[lo:hi])
            if lo < hi and self._fd >= 0:
                self._write(data, lo)

    def _write(self, data: bytes | bytearray, offset: int) -> None:
        try:
            os.pwrite(self._fd, data, offset)
        except OSError as e:
            self._stop(e)

    def _stop(self, e: OSError) -> None:
        log.warning("header check results are no longer kept: %s", e.strerror)
        self._fd = -1


class LayerCache:
    """The cached spans of one layer. Thread-safe; callers pass span boundaries from the zTOC."""

    def __init__(self, directory: Path, ztoc_digest: str, spans: list[tuple[int, int]],
                 owner: "SpanCache | None" = None) -> None:
        self.directory = directory
        self.spans = spans                    # uncompressed [start, end) of every span
        self.total_bytes = spans[-1][1] if spans else 0
        self._owner = owner
        self._lock = threading.Lock()            # the present map and reads
        self._write_lock = threading.Lock()      # writers; taken before _lock, never after it
        self.last_used = time.monotonic()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        meta = f"{ztoc_digest} {len(spans)} {self.total_bytes}\n"
        meta_path = directory / "meta"
        if not meta_path.exists() or meta_path.read_text() != meta:
            # Unknown or different span layout: the old bitmap means nothing now.
            for name in ("present", "data", HEADERS_CHECKED, ENTRIES_CHECKED):
                (directory / name).unlink(missing_ok=True)
            tmp = directory / "meta.tmp"
            tmp.write_text(meta)
            os.replace(tmp, meta_path)
        self._data_fd = os.open(directory / "data", os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._data_fd).st_size != self.total_bytes:
            os.ftruncate(self._data_fd, self.total_bytes)
        self._present_fd = os.open(directory / "present", os.O_RDWR | os.O_CREAT, 0o600)
        present = os.pread(self._present_fd, len(spans), 0)
        # the span states, in shared memory another process may map (the module docstring)
        self.states_fd = os.memfd_create("lazyoci-span-states", os.MFD_CLOEXEC)
        os.ftruncate(self.states_fd, max(len(spans), 1))
        self._present = memoryview(mmap.mmap(self.states_fd, max(len(spans), 1)))[:len(spans)]
        self._present[:] = bytes(SPAN_CACHED if p else 0 for p in present.ljust(len(spans), b"\0"))
        self.cached_bytes = sum(e - s for (s, e), p in zip(spans, self._present) if p)

    # -- queries -------------------------------------------------------------

    @property
    def headers_checked(self) -> bool:
        """True once the whole-layer check passed for this layer and zTOC (it holds across restarts:
        the tar is fixed by the span digests, whatever spans are cached later)."""
        return (self.directory / HEADERS_CHECKED).exists()

    def mark_headers_checked(self) -> None:
        (self.directory / HEADERS_CHECKED).touch(mode=0o600)

    def entry_states(self, count: int) -> "EntryStates":
        """One byte per zTOC entry for the header checks to keep their results in, kept in
        `entries-checked` (EntryStates)."""
        return EntryStates(self.directory / ENTRIES_CHECKED, count)

    @property
    def closed(self) -> bool:
        return self._data_fd < 0

    def has(self, span: int) -> bool:
        return self._present[span] != 0

    def mark_read(self, span: int) -> None:
        """The span fetcher has seen the first read of `span` (cached): see the module docstring."""
        if self._present[span] == SPAN_CACHED:      # (every later read of the span: nothing to do)
            with self._lock:
                if self._present[span]:
                    self._present[span] = SPAN_READ

    def was_read(self, span: int) -> bool:
        """A read has touched the cached span (`mark_read`)."""
        return self._present[span] == SPAN_READ

    def span_length(self, span: int) -> int:
        start, end = self.spans[span]
        return end - start

    def missing(self) -> list[int]:
        return [i for i, p in enumerate(self._present) if not p]

    def read_span_range(self, span: int, start: int, end: int) -> bytes | None:
        """Bytes [start, end) (uncompressed offsets inside `span`), or None if not cached."""
        with self._lock:
            if not self._present[span]:
                return None
            self.last_used = time.monotonic()
            data = os.pread(self._data_fd, end - start, start)
        if len(data) != end - start:
            return None
        return data

    def read_header_range(self, span: int, start: int, end: int) -> bytes | None:
        """`read_span_range` for a tar header check, from the header bytes kept or through the
        chunks kept (the module docstring): the same bytes, read from the disk at most once per
        chunk while it is kept."""
        if self._present[span]:
            kept = HEADER_REGIONS.find(self, span, start, end)
            if kept is not None:
                return kept
        s0, s1 = self.spans[span]
        pieces = []
        chunk = start - start % HEADER_CHUNK
        while chunk < end:
            lo, hi = max(chunk, s0), min(chunk + HEADER_CHUNK, s1)
            data = _HEADER_CHUNKS.get(self, span, chunk) if self._present[span] else None
            if data is None:
                data = self.read_span_range(span, lo, hi)
                if data is None:
                    return None
                _HEADER_CHUNKS.put(self, span, chunk, data)
            pieces.append(data[max(start, lo) - lo:min(end, hi) - lo])
            chunk += HEADER_CHUNK
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    # -- updates -------------------------------------------------------------

    def put(self, span: int, data: bytes) -> None:
        """Store a VERIFIED span: data first and synced, then its present byte."""
        start, end = self.spans[span]
        if len(data) != end - start:
            raise ValueError(f"span {span}: {len(data)} bytes for a {end - start} byte span")
        if self._owner is not None:
            self._owner.make_room(end - start, keep=self)
        # Writing and syncing hold only the write lock (nobody reads a span that is not present
        # yet), so cache hits, which take the read lock, never wait for the disk.
        with self._write_lock:
            if self._present[span]:
                return
            if self._data_fd < 0:
                raise OSError(errno.EBADF, "span cache closed")
            view = memoryview(data)
            off = 0
            while off < len(view):
                off += os.pwrite(self._data_fd, view[off:], start + off)
            os.fdatasync(self._data_fd)
            with self._lock:
                os.pwrite(self._present_fd, b"\1", span)
                self._present[span] = SPAN_CACHED
                self.cached_bytes += end - start
                self.last_used = time.monotonic()
        _WRITTEN.written(self, span)
        if self._owner is not None:
            self._owner.grew(end - start)

    def keep_headers(self, span: int, pieces: Pieces) -> None:
        """Keep the header bytes the span fetcher cut out of a span it stored (the module docstring)."""
        if self._present[span]:
            HEADER_REGIONS.keep(self, span, pieces)

    def drop_pages(self, span: int) -> None:
        """Give the page cache pages of a span of `data` back (written and synced before: the
        module docstring, Memory); where the filesystem keeps them anyway, they stay."""
        start, end = self.spans[span]
        with self._lock:
            if self._data_fd < 0:
                return
            try:
                os.posix_fadvise(self._data_fd, start, end - start, os.POSIX_FADV_DONTNEED)
            except OSError as e:
                log.debug("span cache: cannot drop written pages: %s", e.strerror)

    def evict(self, want: int, from_end: bool = True) -> int:
        """Drop cached spans until `want` bytes are freed; returns what was freed."""
        freed = 0
        with self._lock:
            order = range(len(self.spans) - 1, -1, -1) if from_end else range(len(self.spans))
            for i in order:
                if freed >= want:
                    break
                if not self._present[i]:
                    continue
                start, end = self.spans[i]
                os.pwrite(self._present_fd, b"\0", i)      # clear first: crash-safe order
                os.fsync(self._present_fd)
                self._present[i] = 0
                _HEADER_CHUNKS.forget(self)
                HEADER_REGIONS.forget(self)
                _punch_hole(self._data_fd, start, end - start)
                self.cached_bytes -= end - start
                freed += end - start
        return freed

    def close(self) -> None:
        _HEADER_CHUNKS.forget(self)
        HEADER_REGIONS.forget(self)
        with self._write_lock, self._lock:
            for fd in (self._data_fd, self._present_fd, self.states_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._data_fd = self._present_fd = self.states_fd = -1


class SpanCache:
    """All layer caches under one directory, with a shared size limit (0 = unlimited)."""

    def __init__(self, directory: Path, max_bytes: int = 0) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._layers: dict[str, LayerCache] = {}
        self._lock = threading.Lock()
        self._total = 0
        # the context a layer's bytes change in (see the module docstring)
        self.changing: Callable[[Path], AbstractContextManager[object]] = lambda directory: nullcontext()

    def layer(self, layer_digest: str, ztoc_digest: str, spans: list[tuple[int, int]]) -> LayerCache:
        """The cache of a layer seen through one zTOC (opened once, shared by every mount of that
        pair; another zTOC of the layer has its own, since its spans differ)."""
        key = _key(layer_digest, ztoc_digest)
        with self._lock:
            cache = self._layers.get(key)
            if cache is None:
                self._adopt_unkeyed(layer_digest, ztoc_digest)
                cache = LayerCache(self.directory / key, ztoc_digest, spans, owner=self)
                self._layers[key] = cache
                self._total += cache.cached_bytes
            return cache

    def _adopt_unkeyed(self, layer_digest: str, ztoc_digest: str) -> None:
        """Earlier versions named a layer's directory by the layer digest alone: keep its spans
        under the (layer, zTOC) name when its meta says they belong to this zTOC."""
        old = self.directory / layer_digest.split(":", 1)[-1]
        new = self.directory / _key(layer_digest, ztoc_digest)
        try:
            if not new.exists() and (old / "meta").read_text().split(" ", 1)[0] == ztoc_digest:
                os.rename(old, new)
        except OSError:
            pass        # nothing to adopt (or it cannot be): the spans are fetched again

    def forget(self, layer_digest: str, ztoc_digest: str) -> None:
        """Close a layer's cache (its bytes stay on disk for the next mount)."""
        with self._lock:
            cache = self._layers.pop(_key(layer_digest, ztoc_digest), None)
            if cache is not None:
                self._total -= cache.cached_bytes
        if cache is not None:
            cache.close()

    def purge(self, layer_digest: str, ztoc_digest: str) -> None:
        """Delete a layer's cached bytes from disk."""
        directory = self.directory / _key(layer_digest, ztoc_digest)
        with self.changing(directory):
            self.forget(layer_digest, ztoc_digest)
            shutil.rmtree(directory, ignore_errors=True)

    @property
    def total_bytes(self) -> int:
        return self._total

    def grew(self, n: int) -> None:
        with self._lock:
            self._total += n

    def make_room(self, n: int, keep: LayerCache) -> None:
        """Evict least recently used spans so that `n` more bytes fit under the limit."""
        if not self.max_bytes:
            return
        with self._lock:
            excess = self._total + n - self.max_bytes
            if excess <= 0:
                return
            others = sorted((c for c in self._layers.values() if c is not keep),
                            key=lambda c: c.last_used)
            victims = others + [keep]
        for cache in victims:
            if excess <= 0:
                break
            try:
                with self.changing(cache.directory):
                    freed = cache.evict(excess)
            except LazyociError as e:
                log.warning("span cache: %s keeps its spans: %s", cache.directory.name, e)
                continue
            with self._lock:
                self._total -= freed
            excess -= freed

    def close(self) -> None:
        with self._lock:
            layers = list(self._layers.values())
            self._layers.clear()
            self._total = 0
        for cache in layers:
            cache.close()
