"""`pull --snapshotter soci`: fetch the SOCI index and zTOCs, download only unindexed layers.

Steps: resolve the image once (and the platform's manifest), discover its SOCI index
(explicit digest, v2 annotation, referrers API, tag schema: soci/discovery.py),
store the index manifest and the zTOCs as blobs owned by `soci:<index digest>`,
record which layer each zTOC serves, then let the image fetcher (ImageService.pull)
fetch the image it resolved, skipping the lazy layers (no progress rows for them, as
Finch shows none).
The layer server mounts each lazy layer while the rest downloads. Finally the zTOCs
this index gave the image (under its name) are recorded and the layer snapshots
committed (their keys name those zTOCs: another index of a shared layer never
reuses them).

A layer the index gives no zTOC is still lazy when it carries its own index (an
eStargz TOC, snapshot/own_index.py): per layer, a zTOC if the SOCI index has one,
else the layer's own index, else a full download. `own_only` (the `stargz`
snapshotter) skips the SOCI index and uses the layers' own indexes alone.

No index, an unreadable one, or one without any zTOC for the image's layers (and
no layer with an index of its own): every layer is downloaded (with rows), the image is recorded as `overlayfs`
(it is NOT lazy, and is never reported so) and one INFO line says why. A zTOC
the service refuses to mount (malformed, or over a cap of ztoc/limits.py) makes
its layer downloaded whole after the others, with one INFO line naming the
layers and why; the image stays lazy only if some layer still is. INFO lines go to
the `log` callback: the library never prints.

`LazyPull` is given each collaborator (the snapshotter side, the lazy-layer records,
the layer server, the registry client and the image fetcher), so it never reaches
into a snapshotter or an image service for them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from lazyoci.errors import FormatError, LazyociError
from lazyoci.images.pull import ResolvedImage, resolve_image
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference
from lazyoci.soci.discovery import fetch_index
from lazyoci.store.lazy_layer_records import LazyLayerRecord, LazyLayerRecords

if TYPE_CHECKING:
    from lazyoci.images.progress import ProgressSink
    from lazyoci.images.service import LayerConsumer, LocalImage
    from lazyoci.oci.manifest import Descriptor
    from lazyoci.registry.client import RegistryClient
    from lazyoci.snapshot.layer_server import LayerServer
    from lazyoci.soci.discovery import DiscoveredIndex
    from lazyoci.store.blobs import BlobStore
    from lazyoci.store.db import Database

__all__ = ["ImageFetcher", "LazyPull", "LazySnapshots"]

ZTOC_FETCHES = 4      # zTOCs downloaded at once by a lazy pull (the small ones: `_take_ztocs`)
ZTOC_ALONE_BYTES = 4 << 20     # a zTOC this large is downloaded alone, the largest first
MAX_FETCHED_AHEAD = 4 << 20     # the largest config fetched beside the index, held in memory


class ImageFetcher(Protocol):
    """Fetches an image into the store and records it under its name; stores the blobs of its
    index (ImageService)."""

    def store_owned_blob(self, digest: str, owner: str, *, raw: bytes | None = None, size: int | None = None,
                         fetch: "Callable[[], Iterable[bytes]] | None" = None) -> None: ...

    def pull(self, ref: str, platform: Platform | None = None, progress: "ProgressSink | None" = None, *,
             layer_consumer: "Callable[[Descriptor], LayerConsumer | None] | None" = None,
             skip_layers: "Callable[[Descriptor], bool] | None" = None,
             snapshotter: str = "overlayfs", all_platforms: bool = False,
             resolved: ResolvedImage | None = None) -> "LocalImage": ...


class LazySnapshots(Protocol):
    """The snapshotter side of a lazy pull: unpack while downloading, then commit the layers;
    its blob store and database (a layer's prefetch artifact is recorded beside its view)."""

    blobs: "BlobStore"
    db: "Database"

    def layer_consumer(self, desc: "Descriptor") -> "LayerConsumer | None": ...
    def unpack_image(self, images: object, image: "LocalImage") -> str | None: ...


class _EarlyMounter:
    """Mounts lazy layers in a worker thread while the pull goes on.

    The service parses each zTOC (CPU, in its own process) while this process downloads
    the next zTOC and the unindexed layers, instead of after them. A mount ends once the
    zTOC is checked (`LayerServer.begin_mount`): the service builds the tree and attaches the
    view while the pull goes on. Mounts run one at a
    time, in order; a zTOC the service refuses (FormatError) is kept in `refused` for the
    pull to download that layer instead; any other error stops the rest and is raised by
    finish(). rollback() unmounts what this pull mounted (not layers that were already
    served), so a failed or fallen-back pull leaves nothing mounted.
    """

    def __init__(self, server: "LayerServer") -> None:
        self._server = server
        self._todo: list[LazyLayerRecord] = []
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._mounted: list[tuple[str, str]] = []   # (layer, zTOC) views
        self.refused: dict[str, str] = {}        # layer digest -> why the service refused its zTOC
        self._running = False                    # the service answered (started if need be)
        self._thread = threading.Thread(target=self._run, name="lazy-mount", daemon=True)
        self._thread.start()

    def submit(self, rec: LazyLayerRecord) -> None:
        with self._cond:
            self._todo.append(rec)
            self._cond.notify()

    def _run(self) -> None:
        server = self._server
        while True:
            with self._cond:
                while not self._todo and not self._closed:
                    self._cond.wait()
                if not self._todo:
                    return
                rec = self._todo.pop(0)
            if self._error is not None:
                continue                 # drain: the first error stops the remaining mounts
            try:
                served = os.path.isdir(server.view_dir(rec.layer_digest, rec.ztoc_digest))
                if not self._running:           # once: a ping per layer is a round trip for nothing
                    server.ensure_running()
                    self._running = True
                server.begin_mount(rec.ref, rec.layer_digest, rec.ztoc_digest)
                if not served:
                    self._mounted.append((rec.layer_digest, rec.ztoc_digest))
            except FormatError as e:     # the zTOC cannot be served: the pull downloads the layer
                kind = "zTOC" if rec.index_digest else "its own index"     # no SOCI index: the layer's
                self.refused[rec.layer_digest] = f"{kind} {rec.ztoc_digest}: {e}"
            except BaseException as e:   # re-raised in the caller's thread by finish()
                self._error = e

    def _join(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def wait(self) -> dict[str, str]:
        """Wait for every mount; returns the refused layers (digest -> why)."""
        self._join()
        return self.refused

    def finish(self) -> None:
        """Wait for every mount; raise the first mount error."""
        self._join()
        if self._error is not None:
            raise self._error

    def rollback(self) -> None:
        """Wait, then unmount the layers this pull mounted (best effort: the pull already failed)."""
        self._join()
        for digest, ztoc_digest in reversed(self._mounted):
            try:
                self._server.unmount_layer(digest, ztoc_digest)
            except LazyociError:
                pass
        self._mounted.clear()


class LazyPull:
    """One `pull --snapshotter soci`, over the collaborators it is given."""

    def __init__(self, snapshots: LazySnapshots, records: LazyLayerRecords, server: "LayerServer",
                 client: "RegistryClient", images: ImageFetcher,
                 log: Callable[[str], None] | None = None) -> None:
        self.snapshots = snapshots
        self.records = records
        self.server = server
        self.client = client            # resolves, discovers the index, downloads the zTOCs
        self.images = images            # fetches and records the image, stores the zTOCs
        self.log = log or (lambda line: None)

    def _store_blob(self, ref: Reference, digest: str, size: int | None, owner: str,
                    raw: bytes | None = None) -> None:
        """Store a small blob (index manifest `raw`, or a zTOC downloaded here), owned by `owner`."""
        self.images.store_owned_blob(digest, owner, raw=raw, size=size,
                                     fetch=lambda: self.client.iter_blob(ref, digest, size))

    def _take_ztocs(self, reference: Reference, found: "DiscoveredIndex", layers: list[str], source: str,
                    mounter: _EarlyMounter, say: Callable[[str], None]) -> dict[str, LazyLayerRecord]:
        """Download, store and record the zTOCs (and prefetch artifacts) of `layers`, each handed
        to the mounter as soon as it is stored. The large ones come first, largest first, one at a
        time: the first mounted layer starts its recorded prefetch first, so the layer with the
        most to fetch gets the head start, and its mount, the longest, overlaps the next download
        (python-ml: 0.46 s off the optimized start's median, bench/README.md). The small ones
        follow a few at once in the image's order, where the round trip, not the transfer, is the
        cost. A large one's error is raised at once; among the small ones, the first once all
        have ended."""
        from lazyoci.snapshot.soci_prefetch import take_prefetch_artifact

        owner = f"soci:{found.digest}"
        index = found.index          # parsed once, not per layer
        # a layer's prefetch artifact comes beside its zTOC, not a round trip after it; the layer
        # is mounted once both are recorded (the service starts the prefetch at mount)
        artifacts = ThreadPoolExecutor(max_workers=ZTOC_FETCHES, thread_name_prefix="prefetch-artifact")

        def take(layer_digest: str) -> LazyLayerRecord:
            zdesc = found.ztocs[layer_digest]
            artifact = artifacts.submit(take_prefetch_artifact, index, layer_digest, zdesc.digest,
                                        self.snapshots.blobs, self.snapshots.db,
                                        lambda d, n: self._store_blob(reference, d, n, owner), say)
            self._store_blob(reference, zdesc.digest, zdesc.size, owner)
            rec = LazyLayerRecord(layer_digest, zdesc.digest, source, found.digest)
            self.records.record_layer(rec)
            artifact.result()
            mounter.submit(rec)
            return rec

        try:
            large = sorted((d for d in layers if found.ztocs[d].size >= ZTOC_ALONE_BYTES),
                           key=lambda d: -found.ztocs[d].size)
            taken = {d: take(d) for d in large}
            small = [d for d in layers if d not in taken]      # in the image's order
            if len(small) <= 1:
                taken.update((d, take(d)) for d in small)
            else:
                with ThreadPoolExecutor(max_workers=min(len(small), ZTOC_FETCHES), thread_name_prefix="ztoc") as pool:
                    futures = {d: pool.submit(take, d) for d in small}
                taken.update((d, f.result()) for d, f in futures.items())
            return {d: taken[d] for d in layers}
        finally:
            artifacts.shutdown(wait=True)

    def _small_blob(self, ref: Reference, desc: "Descriptor") -> tuple[str, bytes] | None:
        """A config's digest and bytes (verified against it), fetched while the pull waits for other
        requests; None for a blob too big to hold (the image fetcher streams it as before) or one that
        is not an image config (the image fetcher refuses the artifact without fetching it)."""
        from lazyoci.oci import mediatypes as mt

        if desc.size > MAX_FETCHED_AHEAD or desc.media_type not in (mt.OCI_CONFIG, mt.DOCKER_CONFIG):
            return None
        return desc.digest, b"".join(self.client.iter_blob(ref, desc.digest, desc.size))

    @staticmethod
    def _with_config(resolved: ResolvedImage, config: "Future[tuple[str, bytes] | None] | None") -> ResolvedImage:
        """`resolved` with the config fetched ahead; a failed fetch is left to the image fetcher,
        which asks again and reports its error."""
        try:
            fetched = config.result() if config is not None else None
        except Exception:       # whatever it was, the image fetcher meets it again and says so
            fetched = None
        return resolved if fetched is None else replace(resolved, blobs=resolved.blobs + (fetched,))

    def _fetch(self, ref: str, platform: Platform | None, progress: "ProgressSink | None",
               resolved: ResolvedImage, lazy: dict[str, str]) -> "LocalImage":
        return self.images.pull(ref, platform, progress, layer_consumer=self.snapshots.layer_consumer,
                                skip_layers=(lambda d: d.digest in lazy) if lazy else None,
                                snapshotter="soci" if lazy else "overlayfs", resolved=resolved)

    def run(self, ref: str, platform: Platform | None = None, progress: "ProgressSink | None" = None,
            index_digest: str | None = None, own_only: bool = False) -> "LocalImage":
        from lazyoci.snapshot.own_index import CHUNKED_OWNER_PREFIX, fetch_own_indexes
        from lazyoci.snapshot.soci_prefetch import take_prefetch_artifact
        from lazyoci.soci import discover_index

        say = self.log
        reference = Reference.parse(ref)
        client = self.client
        # Requests that need nothing but what is known already go at once, not one round trip
        # after another: an index asked for by digest beside the tag, the config beside the index.
        ahead = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lazy-pull-ahead")
        try:
            explicit = (ahead.submit(fetch_index, client, reference, index_digest)
                        if index_digest and not own_only else None)
            resolved, manifest = resolve_image(client, reference, platform)
            config = (ahead.submit(self._small_blob, reference, manifest.config)
                      if not self.snapshots.blobs.has(manifest.config.digest) else None)
        except BaseException:
            ahead.shutdown(wait=True)      # no request of this pull outlives its error
            raise
        ahead.shutdown(wait=False)         # (the threads end with their requests)
        manifest_digest = resolved.manifests[0][0] if resolved.manifests else resolved.digest
        reason = None
        lazy: dict[str, str] = {}
        found = None
        try:
            if not own_only:
                found = discover_index(client, reference, manifest, manifest_digest, explicit_digest=index_digest,
                                       explicit=explicit.result() if explicit is not None else None)
        except LazyociError as e:
            if index_digest:          # asked for explicitly: an error, not a silent fallback
                raise
            found, reason = None, f"the SOCI index cannot be read ({e})"
        if found is None and reason is None:
            reason = "no layer carries an index of its own" if own_only else "no SOCI index was found"
        # per layer: a zTOC if the SOCI index has one, else the layer's own index (eStargz)
        refused_own: list[str] = []     # layers' own indexes that cannot be used: said once, below
        own = fetch_own_indexes(client, self.images, reference,
                                [l for l in manifest.layers if found is None or l.digest not in found.ztocs],
                                refused_own.append)
        if found is not None or own:
            self.server.spawn()        # the daemon starts while the zTOCs and the image download
            source = f"{reference.name}@{manifest_digest}"
            mounter = _EarlyMounter(self.server)
            try:
                if found is not None:
                    self._store_blob(reference, found.digest, None, f"soci:{found.digest}",
                                     raw=found.manifest.raw)
                ztoc_layers = [l.digest for l in manifest.layers if found is not None and l.digest in found.ztocs]
                taken = self._take_ztocs(reference, found, ztoc_layers, source, mounter, say) if found else {}
                for layer in manifest.layers:
                    if layer.digest in taken:
                        rec = taken[layer.digest]
                    elif layer.digest in own:     # the layer's own index (no SOCI index digest)
                        rec = LazyLayerRecord(layer.digest, own[layer.digest][0], source, "", own[layer.digest][1])
                        self.records.record_layer(rec)
                        mounter.submit(rec)
                    else:
                        continue
                    lazy[layer.digest] = rec.ztoc_digest
            except LazyociError as e:
                mounter.rollback()
                lazy, reason = {}, f"the SOCI index {found.digest if found else ''} cannot be read ({e})"
            except BaseException:
                mounter.rollback()
                raise
            if not lazy:
                mounter.rollback()      # nothing was submitted, or the fallback already rolled back: stop the worker
            if not lazy and reason is None and found is not None:
                reason = f"the SOCI index {found.digest} has no zTOC for any layer of the image"
            if lazy:
                reason = None
        # zstd:chunked wiring: a layer without a zTOC that carries its own TOC is lazy through it
        from lazyoci.zstdchunked.fetch import chunked_tocs
        chunked = chunked_tocs(client, reference, manifest.layers, lazy, refused_own.append)
        if chunked:
            self.server.spawn()
            if not lazy:            # no SOCI mounter, or one stopped with nothing to mount
                mounter = _EarlyMounter(self.server)
            try:
                for toc in chunked.values():
                    self._store_blob(reference, toc.digest, None, CHUNKED_OWNER_PREFIX + toc.layer_digest,
                                     raw=toc.data)
                    rec = LazyLayerRecord(toc.layer_digest, toc.digest, f"{reference.name}@{manifest_digest}",
                                          toc.digest, "zstd:chunked")
                    self.records.record_layer(rec)
                    mounter.submit(rec)
                    lazy[toc.layer_digest] = toc.digest
            except BaseException:
                mounter.rollback()
                raise
            reason = None
        if refused_own and reason is not None:      # nothing is lazy: the refusals lead the one line
            reason = "; ".join(refused_own + ([] if own_only else [reason]))
        elif refused_own:
            say(f"INFO: {'; '.join(refused_own)} for {reference}: downloading "
                + ("that layer" if len(refused_own) == 1 else "those layers") + " before the container starts")
        if reason is not None:
            say(f"INFO: {reason} for {reference}: downloading every layer before the container starts "
                f"(no lazy loading)")
        resolved = self._with_config(resolved, config)
        try:
            image = self._fetch(ref, platform, progress, resolved, lazy)
            refused = mounter.wait() if lazy else {}
            if refused:
                for digest in refused:
                    self.records.forget_layer(digest, lazy.pop(digest))
                whys = "; ".join(f"layer {digest}: {why}" for digest, why in refused.items())
                ztocs = all(why.startswith("zTOC ") for why in refused.values())
                what = (f"{'a zTOC' if len(refused) == 1 else f'{len(refused)} zTOCs'} of the SOCI index" if ztocs
                        else f"{'a layer index' if len(refused) == 1 else f'{len(refused)} layer indexes'}")
                say(f"INFO: {what} "
                    f"cannot be served ({whys}) for {reference}: downloading "
                    + ("that layer" if len(refused) == 1 else "those layers") + " before the container starts"
                    + ("" if lazy else " (no lazy loading)"))
                image = self._fetch(ref, platform, progress, resolved, lazy)
            # this name's layers: through this index's zTOCs only
            self.records.record_image(image.name or "", image.manifest.digest, lazy)
            self.snapshots.unpack_image(None, image)
        except BaseException:
            if lazy:
                mounter.rollback()
            raise
        if lazy:
            mounter.finish()        # the image is recorded, as before: a mount error is raised after it
        return image
