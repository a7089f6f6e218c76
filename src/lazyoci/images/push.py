"""Push: blobs first (skipping those the registry has, mounting those from a sibling repository),
then platform manifests, then the index, all byte for byte as stored.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from lazyoci.errors import ImageNotFoundError, StoreError
from lazyoci.images.progress import Kind, ProgressEvent, ProgressSink, Status, no_progress, row_key
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import Descriptor, Index, Manifest
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference
from lazyoci.store.image_records import ContentRecord, ImageRecords

DEFAULT_UPLOAD_WORKERS = 3


class Pusher:
    def __init__(self, client, records: ImageRecords, progress: ProgressSink | None = None,
                 workers: int = DEFAULT_UPLOAD_WORKERS) -> None:
        self.client = client
        self.records = records
        self.blobs = records.blobs
        self.progress = progress or no_progress
        self.workers = workers
        self._lock = threading.Lock()

    def push(self, ref: Reference, rec: ContentRecord, platform: Platform | None) -> str:
        if ref.digest and not ref.tag:
            target = ref
        else:
            target = Reference(ref.registry, ref.repository, ref.tag, None)
        self.progress(ProgressEvent(str(target), "resolve", "resolved"))
        if rec.media_type in mt.IMAGE_INDEXES:
            index = Index.parse(self.blobs.read(rec.digest), rec.media_type)
            if platform is None and self.blobs.has_index_content(index):
                manifests = [(d, self._read_manifest(d)) for d in index.manifests]
                for d, m in manifests:
                    self._push_manifest_tree(target, d, m, by_digest=True)
                self.client.put_manifest(target, index.raw, index.media_type)
                self.progress(ProgressEvent(row_key("index", rec.digest), "index", "done"))
                self._remember(target, rec.digest)
                return rec.digest
            # Not every platform is here (or one was asked for): push that platform's manifest
            # to the tag, as docker does; a registry refuses an index whose manifests it lacks.
            digest = self._platform_manifest(rec, platform)
        else:
            digest = rec.digest
        manifest = Manifest.parse(self.blobs.read(digest))
        self._push_manifest_tree(target, manifest.descriptor(), manifest, by_digest=False)
        self._remember(target, rec.digest)
        return digest

    def _read_manifest(self, d: Descriptor) -> Manifest | None:
        return Manifest.parse(self.blobs.read(d.digest), d.media_type) if d.media_type in mt.IMAGE_MANIFESTS else None

    def _platform_manifest(self, rec: ContentRecord, platform: Platform | None) -> str:
        want = platform or Platform.host()
        for manifest, plat, _ in rec.platforms:
            if want.matches(Platform.parse(plat)):
                return manifest
        if platform is None and len(rec.platforms) == 1:
            return rec.platforms[0][0]
        have = ", ".join(p for _, p, _ in rec.platforms) or "none"
        raise ImageNotFoundError(f"image has no {want} platform locally (has: {have})")

    def _push_manifest_tree(self, target: Reference, desc: Descriptor, manifest: Manifest | None,
                            by_digest: bool) -> None:
        raw = self.blobs.read(desc.digest)
        if manifest is not None:
            blobs: list[tuple[Descriptor, Kind]] = [(manifest.config, "config")]
            self._push_blobs(target, blobs + [(l, "layer") for l in manifest.layers])
        key = row_key("manifest", desc.digest)
        self.progress(ProgressEvent(key, "manifest", "uploading", 0, len(raw)))
        where = target.with_digest(desc.digest) if by_digest else target
        self.client.put_manifest(where, raw, desc.media_type)
        self.progress(ProgressEvent(key, "manifest", "done", len(raw), len(raw)))

    def _push_blobs(self, target: Reference, items: list[tuple[Descriptor, Kind]]) -> None:
        seen: dict[str, tuple[Descriptor, Kind]] = {}
        for d, kind in items:
            if not self.blobs.has(d.digest):
                raise StoreError(f"{kind} {d.digest} is not stored locally (lazily pulled?): "
                                 "pull the image with --snapshotter overlayfs before pushing it")
            seen.setdefault(d.digest, (d, kind))
        cancel = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="lazyoci-push")
        try:
            futures = [pool.submit(self._push_blob, target, d, kind, cancel) for d, kind in seen.values()]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                if (error := f.exception()) is not None:
                    cancel.set()
                    wait(pending)
                    raise error
        except BaseException:
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    def _push_blob(self, target: Reference, d: Descriptor, kind: Kind, cancel: threading.Event) -> None:
        if cancel.is_set():
            return
        key = row_key(kind, d.digest)
        mount = self._mount_source(target, d.digest)
        self.progress(ProgressEvent(key, kind, "uploading", 0, d.size))

        def on_progress(n: int) -> None:
            self.progress(ProgressEvent(key, kind, "uploading", n, d.size))

        outcome = self.client.push_blob(target, d.digest, d.size, lambda: self.blobs.open(d.digest),
                                        progress=on_progress, mount_from=mount)
        status: Status = "exists" if outcome == "exists" else "mounted" if outcome == "mounted" else "done"
        self.progress(ProgressEvent(key, kind, status, d.size, d.size))

    def _mount_source(self, target: Reference, digest: str) -> Reference | None:
        for registry, repository in self.records.sources(digest):
            if registry == target.registry and repository != target.repository:
                return Reference(registry, repository)
        return None

    def _remember(self, target: Reference, top: str) -> None:
        """Blobs now also live in the target repository: a later push elsewhere can mount them."""
        digests = self.records.owned_by(f"image:{top}")
        with self.records.db.transaction() as c:
            self.records.record_sources(c, target.registry, target.repository, digests)
