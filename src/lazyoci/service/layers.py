"""The service's lazy layers: mount from a zTOC in the blob store, remember, report.

Mounted layers are recorded in the data root's SQLite database so that a
restarted service mounts them again (overlay lowerdirs keep the same paths).
The registry client is the service's own, built from the config file and the
docker credentials, so `lazyoci service start` after a config change picks it up.
"""

from __future__ import annotations

import ctypes
import gc
import ctypes.util
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from lazyoci.config import Config
from lazyoci.errors import FormatError, LazyociError, StoreError
from lazyoci.fs.background import BackgroundFetcher
from lazyoci.fs.layer_fs import LayerFS, LazyLayer
from lazyoci.fs.span_cache import SpanCache
from lazyoci.fs.span_fetcher import SpanFetcher, flush_cache_writes
from lazyoci.fs.tree import LayerTree
from lazyoci.oci.digest import Digest, verify_bytes
from lazyoci.oci.reference import Reference
from lazyoci.service.records import SCHEMA, SCHEMA_NAME
from lazyoci.store.db import Database
from lazyoci.store.layout import DataRoot

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _release_freed_memory() -> None:
    """Give memory freed by a tree build back to the OS (glibc keeps it otherwise)."""
    gc.collect()     # the build's helper closures form a cycle; collect it before trimming
    try:
        _libc.malloc_trim(0)
    except AttributeError:   # not glibc
        pass



@dataclass(frozen=True)
class LayerStatus:
    layer_digest: str
    ref: str
    ztoc_digest: str
    files: int
    spans: int
    spans_cached: int
    fetched_bytes: int        # uncompressed bytes present in the span cache
    total_bytes: int          # uncompressed size of the layer
    network_bytes: int        # compressed bytes fetched by this service run

    @property
    def percent(self) -> float:
        return 100.0 * self.fetched_bytes / self.total_bytes if self.total_bytes else 100.0

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "percent": round(self.percent, 1)}


class LayerManager:
    """Mounts and unmounts lazy layers in one LayerFS; thread-safe."""

    def __init__(self, root: DataRoot, config: Config, fs: LayerFS) -> None:
        from lazyoci.registry import RegistryClient, RegistryOptions   # A1's client
        from lazyoci.registry.options import TransferLimits

        self.root = root
        self.config = config
        self.fs = fs
        self.db = Database(root.db_path)
        self.db.ensure_schema(SCHEMA_NAME, SCHEMA)
        cache_dir = config.soci.cache_dir or root.soci / "cache"
        if not cache_dir.is_absolute():     # relative to the config file, not to the daemon's cwd (/)
            cache_dir = (config.path.parent if config.path else root.path) / cache_dir
        self.cache = SpanCache(cache_dir, config.soci.cache_max_bytes)
        self.client = RegistryClient(RegistryOptions(
            range_limits=TransferLimits(deadline=config.soci.fetch_timeout_seconds or None,
                                        min_bytes_per_second=config.soci.fetch_min_bytes_per_second,
                                        rate_window=config.soci.fetch_rate_window_seconds),
            insecure_registries=config.insecure_registries, mirrors=dict(config.registry_mirrors)))
        self._meta: dict[str, tuple[str, str, float]] = {}   # digest -> (ref, ztoc digest, monotonic mount time)
        self._lock = threading.Lock()
        self.background: BackgroundFetcher | None = None
        if config.soci.background_fetch:
            self.background = BackgroundFetcher(self._background_layers,
                                                config.soci.background_quiet_seconds,
                                                config.soci.background_interval_ms)

    def _background_layers(self) -> list[tuple[SpanFetcher, float]]:
        with self._lock:
            meta = dict(self._meta)
        return [(l.fetcher, meta[l.digest][2]) for l in self.fs.layers() if l.digest in meta]

    def mount(self, ref: str, layer_digest: str, ztoc_digest: str, persist: bool = True) -> None:
        """Make the layer's directory appear in the FUSE mount (idempotent)."""
        from lazyoci.ztoc import Ztoc       # C's reader

        layer_digest = str(Digest.parse(layer_digest))
        ztoc_digest = str(Digest.parse(ztoc_digest))
        reference = Reference.parse(ref)
        if self.fs.has_layer(layer_digest):
            return
        blob = self.root.blobs / "sha256" / Digest.parse(ztoc_digest).hex
        try:
            data = blob.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"zTOC {ztoc_digest} of layer {layer_digest} is not in the blob store") from None
        verify_bytes(data, ztoc_digest, f"zTOC of layer {layer_digest}")
        started = time.monotonic()
        ztoc = Ztoc.parse(data)
        tree = LayerTree(ztoc, data)
        _release_freed_memory()     # the build's temporary path table is garbage now
        spans = [ztoc.span_uncompressed_range(i) for i in range(ztoc.num_spans)]
        if spans and spans[-1][1] != ztoc.uncompressed_size:
            raise FormatError(f"zTOC {ztoc_digest}: spans end at {spans[-1][1]}, "
                              f"the layer is {ztoc.uncompressed_size} bytes")
        cache = self.cache.layer(layer_digest, ztoc_digest, spans)
        client = self.client

        def fetch(start: int, end: int) -> bytes:
            return client.fetch_range(reference, layer_digest, start, end)

        fetcher = SpanFetcher(ztoc, fetch, cache, layer_digest, verify=self.config.soci.verify)
        with self._lock:
            self._meta[layer_digest] = (str(reference), ztoc_digest, time.monotonic())
        self.fs.add_layer(LazyLayer(layer_digest, tree, fetcher, time.time()))
        log.info("mounted layer %s (%d entries, %d spans, %.1f%% cached) in %.2fs", layer_digest,
                 len(tree), len(spans), 100.0 * cache.cached_bytes / max(cache.total_bytes, 1),
                 time.monotonic() - started)
        if persist:
            with self.db.transaction() as conn:
                conn.execute("INSERT OR REPLACE INTO service_layers VALUES (?, ?, ?, ?)",
                             (layer_digest, str(reference), ztoc_digest, time.time()))

    def unmount(self, layer_digest: str) -> bool:
        layer_digest = str(Digest.parse(layer_digest))
        layer = self.fs.remove_layer(layer_digest)
        with self._lock:
            self._meta.pop(layer_digest, None)
        flush_cache_writes()      # spans still on their way to the disk belong in the cache
        self.cache.forget(layer_digest)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM service_layers WHERE layer_digest=?", (layer_digest,))
        if layer is not None:
            log.info("unmounted layer %s", layer_digest)
        return layer is not None

    def remount_known(self) -> None:
        """Mount the layers recorded by the previous run; a broken one is logged and skipped."""
        with self.db.reading() as conn:
            rows = conn.execute("SELECT layer_digest, ref, ztoc_digest FROM service_layers").fetchall()
        for digest, ref, ztoc_digest in rows:
            try:
                self.mount(ref, digest, ztoc_digest, persist=False)
            except LazyociError as e:
                log.error("cannot mount recorded layer %s again: %s", digest, e)

    def status(self) -> list[LayerStatus]:
        with self._lock:
            meta = dict(self._meta)
        out = []
        for layer in self.fs.layers():
            ref, ztoc_digest, _ = meta.get(layer.digest, ("", "", 0.0))
            f = layer.fetcher
            out.append(LayerStatus(
                layer_digest=layer.digest, ref=ref, ztoc_digest=ztoc_digest, files=len(layer.tree),
                spans=len(f.cache.spans), spans_cached=len(f.cache.spans) - len(f.cache.missing()),
                fetched_bytes=f.cache.cached_bytes, total_bytes=f.cache.total_bytes,
                network_bytes=f.stats.bytes))
        return sorted(out, key=lambda s: s.layer_digest)

    def start_background(self) -> None:
        if self.background is not None:
            self.background.start()

    def close(self) -> None:
        if self.background is not None:
            self.background.stop()
        flush_cache_writes()
        self.cache.close()
        try:
            self.client.close()
        except Exception:   # closing is best effort at shutdown
            pass
