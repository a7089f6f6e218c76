"""The service's lazy layers: mount from a zTOC in the blob store, remember, report.

A layer is served through one zTOC as one view, keyed by (layer digest, zTOC
digest): two indexes of one layer never share a tree, a span cache or a header
check. Mounted views are recorded in the data root's SQLite database so that a
restarted service mounts them again (overlay lowerdirs keep the same paths).
The registry client is the service's own, built from the config file and the
docker credentials, so `lazyoci service start` after a config change picks it up.

Where spans come from: a layer is content-addressed, so any repository that
holds it will do. A view fetches through the references it has been asked to
mount with, the latest first, and after a restart through the references the
lazy pulls recorded last before the view's own (store/lazy_layer_records.py, the one
record of a view's reference: the service's own table says only which views it serves);
each goes through the configured mirrors. A registry that is gone no longer leaves a
layer unreadable.
"""

from __future__ import annotations

import functools
import gc
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from lazyoci import libc
from lazyoci.config import Config
from lazyoci.errors import FormatError, LazyociError, RegistryError, StoreError
from lazyoci.fs.background import BackgroundFetcher, read_as_fetched
from lazyoci.fs.header_check import LayerVerifier
from lazyoci.fs.layer_index import LayerIndex
from lazyoci.fs.layer_fs import TIMEOUT as ENTRY_TIMEOUT, LayerFS, LazyLayer
from lazyoci.fs.sibling_headers import fetch_first_headers
from lazyoci.fs.span_cache import SpanCache
from lazyoci.fs.span_fetcher import FetchRange, FetchRanges, SpanFetcher, StreamRange, flush_cache_writes
from lazyoci.fs.span_prefetch import SpanPrefetch
from lazyoci.fs.streamed_spans import RangeSink
from lazyoci.fs.tree import LayerTree
from lazyoci.oci.digest import Digest, verify_bytes
from lazyoci.oci.reference import Reference
from lazyoci.service import view_records as views
from lazyoci.service.holder_link import HolderPaths
from lazyoci.service.holder_offers import HolderOffers
from lazyoci.service.holder_reads import NO_XATTRS, STOPPED, ReadMap
from lazyoci.service.index_parsing import HelperParse, IndexParser
from lazyoci.service.paths import layer_view_name
from lazyoci.service.prefetch import prefetch_files
from lazyoci.service.unpack_queue import UnpackQueue
from lazyoci.service.view_locks import ViewLocks
from lazyoci.service.view_slots import view_slot
from lazyoci.store.blobs import BlobStore
from lazyoci.store.db import Database
from lazyoci.store.layout import DataRoot
from lazyoci.store.lazy_layer_records import LazyLayerRecords

log = logging.getLogger(__name__)
T = TypeVar("T")


# A tree build leaves about 20 bytes of garbage per entry: below this many entries a full
# collection (7-20 ms of the service's CPU on every mount) frees less than a MiB.
RELEASE_AFTER_ENTRIES = 50_000
SETTLE_SECONDS = 10.0     # `status` and `close` wait this long at most for each view being attached


def _release_freed_memory(entries: int) -> None:
    """Give memory freed by the build of a tree of `entries` back to the OS (glibc keeps it
    otherwise), when there is enough of it to be worth a full collection."""
    if entries < RELEASE_AFTER_ENTRIES:
        return
    gc.collect()     # the build's helper closures form a cycle; collect it before trimming
    libc.malloc_trim()



@dataclass(frozen=True)
class LayerStatus:
    layer_digest: str
    ref: str
    ztoc_digest: str          # the digest of the view's index, whatever its format
    files: int
    spans: int
    spans_cached: int
    fetched_bytes: int        # uncompressed bytes present in the span cache
    total_bytes: int          # uncompressed size of the layer
    network_bytes: int        # compressed bytes fetched by this service run
    read_bytes: int           # bytes handed to reads (file data and tar header checks) by this run
    fetched_spans: int        # spans this run fetched ...
    unread_spans: int         # ... of which no read touched any byte (read-ahead, background)
    unread_bytes: int         # the compressed bytes of those: fetched and never read
    header_only_spans: int    # spans fetched that only tar header checks read
    prefetch_spans: int       # spans of the layer's prefetch artifact not cached at mount (0: none)
    prefetch_done: int        # of those, fetched by now
    mounted_at: float         # wall time the view was mounted
    first_read_at: float | None   # wall time of its first read (None: not read yet)
    format: str = "soci"      # how the layer is indexed (layer_formats.py's label)
    read_wait_seconds: float = 0.0   # how long reads (file data, tar header checks) waited for the network
    unpack: str = ""          # unpacked from the span cache for new containers (service/unpack_queue.py)
    neighbor_spans: int = 0   # spans fetched past the end of the file read (indexes of file chunks)
    neighbor_unread_bytes: int = 0   # the compressed bytes of those no read touched
    neighbor_bytes: int = 0   # the compressed bytes of them all

    @property
    def percent(self) -> float:
        return 100.0 * self.fetched_bytes / self.total_bytes if self.total_bytes else 100.0

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "percent": round(self.percent, 1)}


@dataclass(frozen=True)
class _CheckedIndex:
    """A view's index, checked and parsed: the first half of a mount (`LayerManager.mount`)."""

    ztoc: LayerIndex
    spans: list[tuple[int, int]]     # each span's uncompressed range
    format: str                      # the index format's name ...
    label: str                       # ... and the label `service status` shows
    started: float                   # monotonic time the parse started
    parsed: HelperParse | None       # the helper's parse, whose tree follows; None: parsed here


class LayerManager:
    """Mounts and unmounts lazy layers in one LayerFS; thread-safe."""

    def __init__(self, root: DataRoot, config: Config, fs: LayerFS, holder: HolderPaths | None = None,
                 unpack_complete: bool = False, record_reads: bool = False, parse_helper: bool = False) -> None:
        """`holder`: the session holder to hand the layers' READs to; `unpack_complete`:
        unpack complete layers from the span cache for the soci snapshotter's new containers;
        `record_reads`: keep every read's byte range (`read_order`, for `soci optimize`);
        `parse_helper`: parse large zTOCs in a helper process (service/index_parsing.py)."""
        from lazyoci.registry import RegistryClient, RegistryOptions
        from lazyoci.registry.options import TransferLimits

        self.root = root
        self.config = config
        self.fs = fs
        self.record_reads = record_reads
        self.db = Database(root.db_path)
        views.migrate_view_records(self.db)
        self.lazy_records = LazyLayerRecords(self.db)     # each view's reference and SOCI index
        self.blobs = BlobStore(root)
        cache_dir = config.soci.cache_dir or root.soci / "cache"
        if not cache_dir.is_absolute():     # relative to the config file, not to the daemon's cwd (/)
            cache_dir = (config.path.parent if config.path else root.path) / cache_dir
        self.cache = SpanCache(cache_dir, config.soci.cache_max_bytes)
        # the views whose READs the FUSE session holder answers where it can (none without a holder)
        self.holder_offers = HolderOffers(holder, fs.slot_of) if holder is not None else None
        if self.holder_offers is not None:
            self.cache.changing = self.holder_offers.changing
        # complete views unpacked for the soci snapshotter's new containers
        self.unpacks = UnpackQueue(root, config.path, self.db) if unpack_complete else None
        self.client = RegistryClient(RegistryOptions(
            range_limits=TransferLimits(deadline=config.soci.fetch_timeout_seconds or None,
                                        min_bytes_per_second=config.soci.fetch_min_bytes_per_second,
                                        rate_window=config.soci.fetch_rate_window_seconds),
            insecure_registries=config.insecure_registries, mirrors=dict(config.registry_mirrors)))
        self._meta: dict[tuple[str, str], tuple[str, float]] = {}   # view -> (ref, monotonic mount time)
        self._refs: dict[tuple[str, str], list[Reference]] = {}      # view -> where to fetch, best first
        self._labels: dict[tuple[str, str], str] = {}                # view -> its format's label
        self._prefetch: dict[tuple[str, str], SpanPrefetch] = {}     # view -> its recorded prefetch
        self._lock = threading.Lock()
        self._view_locks = ViewLocks()     # one mount or unmount of a view at a time
        self.index_parser: IndexParser | None = None
        if parse_helper:
            self.index_parser = IndexParser()
            self.index_parser.start()
        self.background: BackgroundFetcher | None = None
        if config.soci.background_fetch:
            self.background = BackgroundFetcher(self._background_layers,
                                                config.soci.background_quiet_seconds,
                                                config.soci.background_interval_ms,
                                                on_start=self._check_as_fetched)

    def _background_layers(self) -> list[tuple[SpanFetcher, float]]:
        with self._lock:
            meta = dict(self._meta)
        return [(l.fetcher, meta[(l.digest, l.ztoc_digest)][1]) for l in self.fs.layers()
                if (l.digest, l.ztoc_digest) in meta]

    def _check_as_fetched(self, fetcher: SpanFetcher) -> None:
        """The background fetcher takes the layer on: its whole-layer tar check starts now and
        follows the spans in, unless the cache's size limit cannot hold the whole layer (then
        it would never be complete)."""
        cache = fetcher.cache
        if self.cache.max_bytes and cache.total_bytes > self.cache.max_bytes:
            return
        for layer in self.fs.layers():
            if layer.fetcher is fetcher:
                layer.verifier.check_layer_once(True, read=read_as_fetched(fetcher))

    def _prefer(self, view: tuple[str, str], refs: list[Reference]) -> list[Reference]:
        """Put `refs` first among the view's references (kept once each); returns the list."""
        with self._lock:
            known = self._refs.setdefault(view, [])
            for r in reversed(refs):
                if r in known:
                    known.remove(r)
                known.insert(0, r)
            return known

    def _fetchers(self, view: tuple[str, str]) -> tuple[FetchRange, FetchRanges, StreamRange]:
        """Fetch compressed bytes of the layer (one range; several in one request, or None where
        the registry does not serve that; one range into a sink as it arrives) through its
        references in order; the first that
        answers goes to the front. A layer is content-addressed (and every span is checked
        against the zTOC), so which repository serves it does not matter."""
        client, layer_digest = self.client, view[0]

        def through_refs(call: Callable[[Reference], T]) -> T:
            with self._lock:
                refs = list(self._refs.get(view, ()))
            error: RegistryError | None = None
            for r in refs:
                try:
                    data = call(r)
                except RegistryError as e:
                    log.warning("layer %s: fetching from %s failed: %s", layer_digest, r, e)
                    error = e
                    continue
                if r is not refs[0]:
                    self._prefer(view, [r])
                return data
            raise error or RegistryError(f"layer {layer_digest}: no repository to fetch it from")

        def fetch(start: int, end: int) -> bytes:
            return through_refs(lambda r: client.fetch_range(r, layer_digest, start, end))

        def fetch_many(ranges: list[tuple[int, int]]) -> list[bytes] | None:
            return through_refs(lambda r: client.fetch_ranges(r, layer_digest, ranges))

        def stream(start: int, end: int, begin: Callable[[], RangeSink]) -> None:
            through_refs(lambda r: client.stream_range(r, layer_digest, start, end, begin))

        return fetch, fetch_many, stream

    def mount(self, ref: str, layer_digest: str, ztoc_digest: str, persist: bool = True,
              fallback_refs: Sequence[str] = (), attach_later: bool = False) -> None:
        """Make the layer's view through this zTOC appear in the FUSE mount (idempotent).

        Mounting a mounted view again with another reference makes that reference the
        first to fetch from (the image was pulled again, maybe from elsewhere).

        `attach_later` (a pull): return once the index is checked and parsed, so a zTOC that
        cannot be served is refused now, as ever; a thread of its own builds the tree and attaches
        the view while the pull goes on. A mount or unmount of the view meanwhile waits for that
        thread (service/view_locks.py); if the attach fails, it is logged and the next mount of the
        view tries again and raises the error."""
        layer_digest = str(Digest.parse(layer_digest))
        ztoc_digest = str(Digest.parse(ztoc_digest))
        reference = Reference.parse(ref)
        view = (layer_digest, ztoc_digest)
        self._view_locks.acquire(view)
        handed_on = False
        try:
            if self.fs.has_layer(layer_digest, ztoc_digest):
                if persist:
                    self._prefer(view, [reference])
                    self.lazy_records.record_served_ref(layer_digest, ztoc_digest, str(reference))
                return
            index = self._checked_index(layer_digest, ztoc_digest)
            attach = functools.partial(self._attach, view, reference, index, persist, fallback_refs)
            if attach_later:
                self._view_locks.hand_on(view)
                threading.Thread(target=self._attach_then_release, args=(view, attach),
                                 name="attach-view", daemon=True).start()
                handed_on = True
            else:
                attach()
        finally:
            if not handed_on:
                self._view_locks.release(view)

    def _attach_then_release(self, view: tuple[str, str], attach: Callable[[], None]) -> None:
        try:
            attach()
        except Exception as e:     # the next mount of the view tries again and says why
            log.error("layer %s: its view through %s could not be attached: %s", view[0], view[1], e,
                      exc_info=not isinstance(e, LazyociError))
        finally:
            self._view_locks.release(view)

    def _checked_index(self, layer_digest: str, ztoc_digest: str) -> "_CheckedIndex":
        """The view's index from the blob store, checked against its digest and parsed (a
        FormatError if it cannot be served); its tree comes with it or follows (`tree()`)."""
        from lazyoci.layer_formats import format_named

        rec = self.lazy_records.layer(layer_digest, ztoc_digest)
        fmt = format_named(rec.format if rec is not None else "ztoc")
        what = "zTOC" if fmt.name == "ztoc" else f"{fmt.name} index"
        if not self.blobs.has(ztoc_digest):
            raise StoreError(f"{what} {ztoc_digest} of layer {layer_digest} is not in the blob store")
        with self.blobs.open(ztoc_digest) as f:
            data = f.read()
        verify_bytes(data, ztoc_digest, f"{what} of layer {layer_digest}")
        started = time.monotonic()
        parsed = self.index_parser.parse(str(self.blobs.path(ztoc_digest)), ztoc_digest, data) \
            if self.index_parser is not None and fmt.name == "ztoc" else None
        # the format the pull recorded (a zTOC without a record)
        ztoc: LayerIndex = parsed.ztoc if parsed is not None else fmt.open(data, ztoc_digest)
        spans = [ztoc.span_uncompressed_range(i) for i in range(ztoc.num_spans)]
        if spans and spans[-1][1] != ztoc.uncompressed_size:
            raise FormatError(f"zTOC {ztoc_digest}: spans end at {spans[-1][1]}, "
                              f"the layer is {ztoc.uncompressed_size} bytes")
        return _CheckedIndex(ztoc, spans, fmt.name, fmt.label, started, parsed)

    def _attach(self, view: tuple[str, str], reference: Reference, index: "_CheckedIndex", persist: bool,
                fallback_refs: Sequence[str]) -> None:
        """Serve a view whose index is checked: its tree, span cache, fetcher and header checks,
        in the FUSE mount and handed to the session holder; its recorded prefetch started."""
        layer_digest, ztoc_digest = view
        ztoc, spans = index.ztoc, index.spans
        tree = index.parsed.tree() if index.parsed is not None else None
        if tree is None:
            tree = LayerTree(ztoc)
            _release_freed_memory(len(tree))     # the build's temporary path table is garbage now
        cache = self.cache.layer(layer_digest, ztoc_digest, spans)
        refs = []
        for r in fallback_refs:
            try:
                refs.append(Reference.parse(r))
            except LazyociError:
                continue
        self._prefer(view, [reference])
        self._prefer(view, refs)
        fetch, fetch_many, stream = self._fetchers(view)
        fetcher = SpanFetcher(ztoc, fetch, cache, layer_digest, fetch_ranges=fetch_many, stream_range=stream)
        if self.record_reads:
            fetcher.ranges = []
        checked = cache.headers_checked or not getattr(ztoc, "headers_in_stream", True)   # or a TOC vouches for them
        verifier = LayerVerifier(ztoc, functools.partial(fetcher.read, header=True),
                                 functools.partial(fetcher.read_cached, header=True), layer_digest,
                                 read_layer=functools.partial(fetcher.read, background=True),
                                 state=None if checked else cache.entry_states(len(ztoc)))
        layer = LazyLayer(layer_digest, tree, fetcher, time.time(), verifier,
                          self._xattrs_disabled(layer_digest, ztoc_digest))
        self._watch_completion(layer, checked)
        with self._lock:
            self._meta[view] = (str(reference), time.monotonic())
            self._labels[view] = index.label
        slot = view_slot(self.db, layer_view_name(layer_digest, ztoc_digest))
        if self.holder_offers is not None:       # what the session holder may read of it
            read_map = layer.read_map = ReadMap.create(len(tree), [s for s, _ in spans] + [cache.total_bytes],
                                                       int(ENTRY_TIMEOUT), NO_XATTRS if layer.xattrs_disabled else 0)
            verifier.on_broken = functools.partial(read_map.set_flag, STOPPED)
        self.fs.add_layer(layer, slot)
        if self.holder_offers is not None:
            self.holder_offers.offer(layer)
        verifier.check_layer_once(cache.cached_bytes >= cache.total_bytes)    # a layer cached whole: check its tiling now
        if checked:
            self._complete(layer)      # if complete already: the holder reads it and it is unpacked now
        log.info("mounted layer %s through its %s index (%d entries, %d spans, %.1f%% cached) in %.2fs%s",
                 layer_digest, index.format, len(tree), len(spans),
                 100.0 * cache.cached_bytes / max(cache.total_bytes, 1), time.monotonic() - index.started,
                 ", parsed by the helper" if index.parsed is not None else "")
        if not self._start_prefetch(view, ztoc.num_spans, fetcher) and not checked:
            fetch_first_headers(fetcher)       # the headers every lookup into the layer checks first
        prefetch_files(ztoc, fetcher, layer_digest)
        if persist:
            self.lazy_records.record_served_ref(layer_digest, ztoc_digest, str(reference))
            views.record_view(self.db, layer_digest, ztoc_digest, time.time())

    def _complete(self, layer: LazyLayer) -> None:
        """The view may be complete (and checked): the session holder answers all its READs
        (service/holder_offers.py) and it is unpacked for new containers (service/unpack_queue.py).
        Both look for themselves whether it is ready."""
        if self.holder_offers is not None:
            self.holder_offers.complete(layer)
        if self.unpacks is not None:
            self.unpacks.want(layer)

    def _watch_completion(self, layer: LazyLayer, checked: bool) -> None:
        """What happens as the layer's spans come in: once every one is cached, the whole-layer tar
        check (unless it `checked` already, or a TOC vouches for the headers), the session holder
        answering its every READ and the unpack for new containers (`_complete`)."""
        cache, verifier = layer.fetcher.cache, layer.verifier
        if checked:
            verifier.passed_before()
            layer.fetcher.keep_headers = False
            layer.fetcher.on_stored = lambda: self._complete(layer)
            return

        def layer_ok() -> None:
            cache.mark_headers_checked()
            layer.fetcher.keep_headers = False
            self._complete(layer)

        def stored() -> None:
            complete = cache.cached_bytes >= cache.total_bytes
            verifier.check_layer_once(complete)
            if complete:     # a check that passed before the last span came; the unpack needs none
                self._complete(layer)

        verifier.on_layer_ok = layer_ok
        layer.fetcher.on_stored = stored

    def _start_prefetch(self, view: tuple[str, str], num_spans: int, fetcher: SpanFetcher) -> bool:
        """Fetch the spans of the view's prefetch artifact (recorded by the pull) now, in the
        background; an artifact that is missing, does not verify or does not fit the zTOC is
        logged and ignored (prefetch only speeds reads up). True if the view has an artifact."""
        from lazyoci.service.prefetch_records import prefetch_artifact
        try:
            digest = prefetch_artifact(self.db, *view)
        except (sqlite3.Error, StoreError) as e:
            log.warning("layer %s: cannot look up its prefetch artifact: %s", view[0], e)
            return False
        if digest is None:
            return False
        from lazyoci.soci.prefetch import PrefetchArtifact
        what = f"prefetch artifact {digest} of layer {view[0]}"
        try:
            data = self.blobs.read(digest)        # verified again: a blob on disk may have rotted
            artifact = PrefetchArtifact.parse(data, what)
            artifact.check_spans(num_spans, what)
        except LazyociError as e:
            log.error("%s: %s; no prefetch", what, e)
            return False
        fetcher.recorded = frozenset(artifact.spans())      # its reads read ahead no further
        spans = [i for i in artifact.spans() if not fetcher.cache.has(i)]
        prefetch = SpanPrefetch(fetcher, spans)
        with self._lock:
            self._prefetch[view] = prefetch
        if spans:
            prefetch.start()
        log.info("layer %s: prefetching %d spans of %s (%d already cached)", view[0], len(spans), digest,
                 len(artifact.spans()) - len(spans))
        return True

    def unmount(self, layer_digest: str, ztoc_digest: str) -> bool:
        layer_digest = str(Digest.parse(layer_digest))
        ztoc_digest = str(Digest.parse(ztoc_digest))
        view = (layer_digest, ztoc_digest)
        self._view_locks.acquire(view)      # after an attach under way (a pull's rollback)
        try:
            return self._unmount(view)
        finally:
            self._view_locks.release(view)

    def _unmount(self, view: tuple[str, str]) -> bool:
        layer_digest, ztoc_digest = view
        served = self.fs.layer(layer_digest, ztoc_digest)
        if served is not None and self.holder_offers is not None:
            try:
                self.holder_offers.withdraw(served)
            except LazyociError as e:       # its bytes stay as they are; a later change asks again
                log.warning("layer %s: the FUSE session holder may still read it: %s", layer_digest, e)
        layer = self.fs.remove_layer(layer_digest, ztoc_digest)
        if layer is not None and layer.read_map is not None:
            layer.read_map.close_descriptor()
        if self.unpacks is not None:
            self.unpacks.forget(layer_digest, ztoc_digest)
        with self._lock:
            self._meta.pop(view, None)
            self._refs.pop(view, None)
            self._labels.pop(view, None)
            self._prefetch.pop(view, None)
        flush_cache_writes()      # spans still on their way to the disk belong in the cache
        self.cache.forget(layer_digest, ztoc_digest)
        views.forget_layers(self.db, [view])
        if layer is not None:
            log.info("unmounted layer %s (%s)", layer_digest, layer_view_name(layer_digest, ztoc_digest))
        return layer is not None

    def remount_known(self) -> None:
        """Mount the views recorded by the previous run; a broken one is logged and skipped.

        Spans are fetched first through the references the latest lazy pulls recorded for
        the layer, then through the view's own recorded reference."""
        for digest, ztoc_digest in views.recorded_views(self.db):
            rec = self.lazy_records.layer(digest, ztoc_digest)
            if rec is None:
                log.error("cannot mount recorded layer %s again: no record of its index %s", digest, ztoc_digest)
                continue
            try:
                self.mount(rec.ref, digest, ztoc_digest, persist=False, fallback_refs=self._pulled_refs(digest))
            except LazyociError as e:
                log.error("cannot mount recorded layer %s again: %s", digest, e)

    def _xattrs_disabled(self, layer_digest: str, ztoc_digest: str) -> bool:
        """Whether the index the lazy pull recorded for this view marks the zTOC `disable-xattrs`.
        Anything unreadable says no: xattrs are then served (and checked) as usual."""
        from lazyoci.soci.index import ANN_LAYER_DIGEST, SociIndex, xattrs_disabled
        try:
            rec = self.lazy_records.layer(layer_digest, ztoc_digest)
            if rec is None or not rec.index_digest:
                return False
            with self.blobs.open(rec.index_digest) as f:
                data = f.read()
            verify_bytes(data, rec.index_digest, "SOCI index")
            index = SociIndex.parse(data)
        except (sqlite3.Error, OSError, LazyociError):
            return False
        return any(d.digest == ztoc_digest and xattrs_disabled(d) for d in index.ztocs
                   if d.annotations.get(ANN_LAYER_DIGEST) == layer_digest)

    def _pulled_refs(self, layer_digest: str) -> list[str]:
        """The references the lazy pulls recorded for the layer, the latest first (any index's:
        a layer is content-addressed, and spans are checked against the view's own zTOC)."""
        try:
            return self.lazy_records.pulled_refs(layer_digest)
        except (sqlite3.Error, StoreError):    # no lazy pull yet in this data root
            return []

    def status(self) -> list[LayerStatus]:
        self._view_locks.settle(SETTLE_SECONDS)     # a view a pull just checked shows once attached
        with self._lock:
            meta = dict(self._meta)
            labels = dict(self._labels)
            prefetches = dict(self._prefetch)
        out = []
        for layer in self.fs.layers():
            ref, _ = meta.get((layer.digest, layer.ztoc_digest), ("", 0.0))
            f = layer.fetcher
            use = f.span_use()
            pf = prefetches.get((layer.digest, layer.ztoc_digest))
            progress = pf.progress() if pf is not None else None
            out.append(LayerStatus(
                layer_digest=layer.digest, ref=ref, ztoc_digest=layer.ztoc_digest, files=len(layer.tree),
                spans=len(f.cache.spans), spans_cached=len(f.cache.spans) - len(f.cache.missing()),
                fetched_bytes=f.cache.cached_bytes, total_bytes=f.cache.total_bytes,
                network_bytes=f.stats.bytes, read_bytes=f.stats.read_bytes, fetched_spans=use.fetched,
                unread_spans=use.unread, unread_bytes=use.unread_bytes, header_only_spans=use.header_only,
                neighbor_spans=use.neighbors, neighbor_unread_bytes=use.neighbors_unread_bytes,
                neighbor_bytes=use.neighbors_bytes,
                prefetch_spans=progress.spans if progress else 0, prefetch_done=progress.done if progress else 0,
                mounted_at=layer.mounted_at, first_read_at=f.first_read_at,
                format=labels.get((layer.digest, layer.ztoc_digest), "soci"),
                read_wait_seconds=round(f.stats.read_wait, 3),
                unpack=self.unpacks.state(layer.digest, layer.ztoc_digest) if self.unpacks else ""))
        return sorted(out, key=lambda s: s.layer_digest)

    def read_order(self) -> list[tuple[str, str, list[int], list[tuple[int, int]]]]:
        """(layer, zTOC, spans in the order reads first touched them, the byte ranges reads asked
        for if recorded) of every mounted view."""
        return [(l.digest, l.ztoc_digest, l.fetcher.read_order(), l.fetcher.read_ranges())
                for l in self.fs.layers()]

    def start_background(self) -> None:
        if self.background is not None:
            self.background.start()

    def close(self) -> None:
        self._view_locks.settle(SETTLE_SECONDS)
        if self.index_parser is not None:
            self.index_parser.close()
        if self.unpacks is not None:
            self.unpacks.close()
        if self.background is not None:
            self.background.stop()
        if self.holder_offers is not None:
            self.holder_offers.close()
        flush_cache_writes()
        self.cache.close()
        try:
            self.client.close()
        except Exception:   # closing is best effort at shutdown
            pass
