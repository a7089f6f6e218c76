"""Pull: resolve, fetch the index/manifest/config byte for byte, then the layers in parallel.

Every blob goes through a BlobWriter (verified while streaming, published by
atomic rename only when the digest matches) under a lease, so a failed or
interrupted pull leaves nothing half-written and nothing a concurrent `gc`
could take away. The image's name is recorded last, in one transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazyoci.errors import FormatError, PullCancelled
from lazyoci.images.layersize import uncompressed_size
from lazyoci.images.progress import Kind, ProgressEvent, ProgressSink, no_progress, row_key
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import Descriptor, ImageConfig, Index, Manifest, parse_any
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference
from lazyoci.store.image_records import ImageRecords, Lease

if TYPE_CHECKING:
    from lazyoci.images.service import LayerConsumer

# containerd's default: three layers at a time keeps a link busy without thrashing.
DEFAULT_LAYER_WORKERS = 3
_PROGRESS_STEP = 256 << 10


@dataclass(frozen=True)
class PulledPlatform:
    manifest: Manifest
    config: ImageConfig
    platform: Platform


@dataclass(frozen=True)
class PullResult:
    ref: Reference
    digest: str               # top-level digest
    media_type: str
    platforms: tuple[PulledPlatform, ...]


@dataclass(frozen=True)
class PullHooks:
    """What the snapshotter plugs in: unpack while downloading, and layers to leave remote."""

    layer_consumer: Callable[[Descriptor], LayerConsumer | None] | None = None
    skip_layers: Callable[[Descriptor], bool] | None = None


@dataclass(frozen=True)
class ResolvedImage:
    """A reference resolved once: its top-level bytes and the platform manifests already fetched
    (each verified by the registry client), so that a pull that had to look at the image first
    (the lazy pull, to find its SOCI index) neither asks for the tag again nor sees it move."""

    digest: str
    media_type: str
    raw: bytes
    manifests: tuple[tuple[str, str, bytes], ...] = ()   # (digest, media type, raw)
    blobs: tuple[tuple[str, bytes], ...] = ()     # (digest, raw): small blobs (a config) fetched already


def resolve_image(client, ref: Reference, platform: Platform | None) -> tuple[ResolvedImage, Manifest]:
    """Resolve `ref` and fetch the manifest of `platform` (default: this host's)."""
    raw, media_type, digest = client.get_manifest(ref)
    obj = parse_any(raw, media_type)
    if not isinstance(obj, Index):
        return ResolvedImage(digest, media_type, raw), Manifest.parse(raw, media_type)
    desc = obj.select(platform or Platform.host())
    mraw, mmedia, mdigest = client.get_manifest(ref.with_digest(desc.digest))
    if mdigest != desc.digest:
        raise FormatError(f"registry returned manifest {mdigest} for {desc.digest}")
    return (ResolvedImage(digest, media_type, raw, ((mdigest, mmedia, mraw),)),
            Manifest.parse(mraw, mmedia))


class Puller:
    def __init__(self, client, records: ImageRecords, progress: ProgressSink | None = None,
                 workers: int = DEFAULT_LAYER_WORKERS) -> None:
        self.client = client
        self.records = records
        self.blobs = records.blobs
        self.progress = progress or no_progress
        self.workers = workers
        self._cancel = threading.Event()
        self._fetched: dict[str, tuple[str, bytes]] = {}     # manifests the caller resolved already
        self._fetched_blobs: dict[str, bytes] = {}            # configs the caller fetched already

    def run(self, ref: Reference, platform: Platform | None, all_platforms: bool,
             hooks: PullHooks, snapshotter: str, resolved: ResolvedImage | None = None) -> PullResult:
        """Pull `ref` (already resolved to `resolved`, if given: the tag is not asked again)."""
        self.records.recover()
        key = str(ref)
        self.progress(ProgressEvent(key, "resolve", "resolving"))
        if resolved is None:
            raw, media_type, top = self.client.get_manifest(ref)
        else:
            raw, media_type, top = resolved.raw, resolved.media_type, resolved.digest
            self._fetched = {d: (m, r) for d, m, r in resolved.manifests}
            self._fetched_blobs = dict(resolved.blobs)
        self.progress(ProgressEvent(key, "resolve", "resolved"))
        with self.records.lease() as lease:
            top_obj = parse_any(raw, media_type)
            kind: Kind = "index" if isinstance(top_obj, Index) else "manifest"
            self._store_bytes(lease, raw, top, kind)
            if isinstance(top_obj, Index):
                descs = self._choose(top_obj, platform, all_platforms)
                manifests = [(self._fetch_manifest(lease, ref, d), d.platform) for d in descs]
            else:
                manifests = [(top_obj, None)]
            pulled = [self._fetch_config(lease, ref, m, p, platform if p is None else None)
                      for m, p in manifests]
            self._fetch_layers(lease, ref, pulled, hooks)
            all_blobs = {top} | {p.manifest.digest for p in pulled} | {p.manifest.config.digest for p in pulled}
            all_blobs |= {l.digest for p in pulled for l in p.manifest.layers}
            with self.records.db.transaction() as c:
                self.records.record_content(
                    c, top, top_obj.media_type, snapshotter,
                    [(p.manifest.digest, p.platform, p.manifest.config.digest) for p in pulled],
                    all_blobs)
                self.records.record_sources(c, ref.registry, ref.repository, all_blobs)
                released = self.records.point_name(c, str(ref), top)
        if released:
            self.records.gc()
        return PullResult(ref, top, top_obj.media_type, tuple(pulled))

    # --- index, manifests, config ----------------------------------------------------------

    def _choose(self, index: Index, platform: Platform | None, all_platforms: bool) -> list[Descriptor]:
        if all_platforms:
            descs = [d for d in index.image_manifests() if d.media_type in mt.IMAGE_MANIFESTS]
            if not descs:
                raise FormatError("the index lists no image manifests")
            return descs
        return [index.select(platform or Platform.host())]

    def _store_bytes(self, lease: Lease, raw: bytes, digest: str, kind: Kind) -> None:
        lease.add([digest])
        if not self.blobs.has(digest):
            self.blobs.put_bytes(raw, digest)
        self.progress(ProgressEvent(row_key(kind, digest), kind, "done", len(raw), len(raw)))

    def _fetch_manifest(self, lease: Lease, ref: Reference, desc: Descriptor) -> Manifest:
        if desc.media_type not in mt.IMAGE_MANIFESTS:
            raise FormatError(f"index entry {desc.digest} is a {desc.media_type}, not an image manifest")
        lease.add([desc.digest])
        if self.blobs.has(desc.digest):
            raw = self.blobs.read(desc.digest)
            media_type = desc.media_type
        elif desc.digest in self._fetched:
            media_type, raw = self._fetched[desc.digest]
        else:
            raw, media_type, digest = self.client.get_manifest(ref.with_digest(desc.digest))
            if digest != desc.digest:
                raise FormatError(f"registry returned manifest {digest} for {desc.digest}")
        manifest = Manifest.parse(raw, media_type)
        self._store_bytes(lease, raw, desc.digest, "manifest")
        return manifest

    def _fetch_config(self, lease: Lease, ref: Reference, manifest: Manifest,
                      index_platform: Platform | None, wanted: Platform | None) -> PulledPlatform:
        desc = manifest.config
        if desc.media_type not in (mt.OCI_CONFIG, mt.DOCKER_CONFIG):
            what = manifest.artifact_type or desc.media_type
            raise FormatError(f"{ref} is not a container image (it is a {what} artifact)")
        lease.add([desc.digest])
        key = row_key("config", desc.digest)
        if not self.blobs.has(desc.digest):
            with self.blobs.writer(desc.digest, desc.size) as w:
                fetched = self._fetched_blobs.get(desc.digest)      # checked again by the writer
                for chunk in [fetched] if fetched is not None else self.client.iter_blob(ref, desc.digest, desc.size):
                    w.write(chunk)
                w.commit()
        raw = self.blobs.read(desc.digest)
        config = ImageConfig.parse(raw)
        self.progress(ProgressEvent(key, "config", "done", len(raw), len(raw)))
        if len(config.diff_ids) != len(manifest.layers):
            raise FormatError(f"image {manifest.digest}: config lists {len(config.diff_ids)} diff_ids "
                              f"for {len(manifest.layers)} layers")
        plat = index_platform or config.platform
        if wanted is not None and not wanted.matches(plat):
            raise FormatError(f"image {ref} is {plat}, not the requested platform {wanted}")
        return PulledPlatform(manifest, config, plat)

    # --- layers ----------------------------------------------------------------------------

    def _fetch_layers(self, lease: Lease, ref: Reference, pulled: list[PulledPlatform],
                      hooks: PullHooks) -> list[Descriptor]:
        unique: dict[str, Descriptor] = {}
        for p in pulled:
            for layer in p.manifest.layers:
                mt.layer_compression(layer.media_type)    # refuse unknown layer types up front
                if hooks.skip_layers and hooks.skip_layers(layer):
                    continue
                unique.setdefault(layer.digest, layer)
        todo = list(unique.values())
        lease.add(d.digest for d in todo)   # before `has`: gc must not remove what we decide to keep
        for d in todo:
            self.progress(ProgressEvent(row_key("layer", d.digest), "layer", "waiting", 0, d.size))
        self._cancel.clear()
        pool = ThreadPoolExecutor(max_workers=max(1, self.workers), thread_name_prefix="lazyoci-pull")
        try:
            futures = [pool.submit(self._layer, ref, d, hooks) for d in todo]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                self._cancel.set()
                wait(pending)
                errors = [e for f in futures if f.done() and (e := f.exception()) is not None]
                real = [e for e in errors if not isinstance(e, PullCancelled)]
                raise (real or errors)[0]
        except BaseException:
            # KeyboardInterrupt lands here in the main thread: stop the workers, let them clean up.
            self._cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return todo

    def _layer(self, ref: Reference, desc: Descriptor, hooks: PullHooks) -> None:
        if self._cancel.is_set():
            raise PullCancelled("pull cancelled")
        key = row_key("layer", desc.digest)
        if self.blobs.has(desc.digest):
            # No bytes arrive, so no consumer: the snapshotter unpacks stored blobs itself if needed.
            self.progress(ProgressEvent(key, "layer", "exists", desc.size, desc.size))
            return
        consumer = hooks.layer_consumer(desc) if hooks.layer_consumer else None
        # iter_blob verifies size and digest and raises before it ends; commit comes after.
        writer = self.blobs.writer(desc.digest, desc.size, verified_upstream=True)
        reported = 0
        try:
            self.progress(ProgressEvent(key, "layer", "downloading", 0, desc.size))
            for chunk in self.client.iter_blob(ref, desc.digest, desc.size):
                if self._cancel.is_set():
                    raise PullCancelled("pull cancelled")
                writer.write(chunk)
                if consumer is not None:
                    consumer.write(chunk)
                if writer.count - reported >= _PROGRESS_STEP:
                    reported = writer.count
                    self.progress(ProgressEvent(key, "layer", "downloading", reported, desc.size))
            writer.commit()    # verifies size and digest, then publishes
        except BaseException as e:
            writer.abort()
            if consumer is not None:
                consumer.abort(e)
            raise
        size = consumer.finish() if consumer is not None else None
        if size is None:    # nothing unpacked it while it arrived: inflate the stored blob once
            with self.blobs.open(desc.digest) as f:
                size = uncompressed_size(f, mt.layer_compression(desc.media_type))
        if size is not None:
            self.records.record_layer_size(desc.digest, size)
        self.progress(ProgressEvent(key, "layer", "done", desc.size, desc.size))
