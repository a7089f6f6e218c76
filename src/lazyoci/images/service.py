"""ImageService: the library API over the local store and the registry (the CLI is a thin shell on it)."""

from __future__ import annotations

import builtins
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from lazyoci.errors import ImageNotFoundError, LazyociError, ReferenceError_, StoreError
from lazyoci.images.progress import ProgressSink
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import Descriptor, ImageConfig, Manifest
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference
from lazyoci.registry.options import RegistryOptions
from lazyoci.store.blobs import BlobStore
from lazyoci.store.db import Database
from lazyoci.store.layout import DataRoot
from lazyoci.store.image_records import ContentRecord, GcResult, ImageRecords, Lease

if TYPE_CHECKING:
    from lazyoci.images.pull import ResolvedImage
    from lazyoci.registry import RegistryClient

_ID_RE = re.compile(r"^(sha256:)?[0-9a-f]{4,64}$")


@dataclass(frozen=True)
class LocalImage:
    name: str | None           # full normalised reference, e.g. "127.0.0.1:5000/app:latest"
    digest: str                # the top-level digest that was pulled/tagged (index or manifest)
    manifest: Manifest         # the platform's image manifest
    config: ImageConfig
    snapshotter: str           # "overlayfs" or "soci": how its layers are prepared

    @property
    def id(self) -> str:
        """The 12-hex IMAGE ID (of the top-level digest, as nerdctl shows)."""
        return self.digest.split(":", 1)[1][:12]


@dataclass(frozen=True)
class ImageSummary:
    """One row of `images`: a name (or <none>) and one platform available locally."""

    name: str | None
    repository: str
    tag: str
    digest: str
    platform: str
    manifest: str
    created: str | None       # the image config's creation time (RFC 3339)
    size: int                 # unpacked size (uncompressed layers)
    blob_size: int            # bytes of blobs stored locally for this image
    snapshotter: str


@dataclass(frozen=True)
class RemoveResult:
    untagged: tuple[str, ...]
    deleted: tuple[str, ...]
    gc: GcResult


class LayerConsumer(Protocol):
    """Lets the snapshotter unpack while the bytes arrive; `finish` only after the digest verified.

    `finish` returns the layer's uncompressed size if the consumer counted it (an unpacker
    does), so that the pull need not inflate the layer a second time to learn it."""

    def write(self, chunk: bytes) -> None: ...
    def finish(self) -> int | None: ...
    def abort(self, exc: BaseException) -> None: ...


class ImageService:
    def __init__(self, root: DataRoot, registry: RegistryOptions = RegistryOptions(),
                 client: RegistryClient | None = None) -> None:
        """`client`: the registry client to use (closed with the service); default: one made from
        `registry` on first use."""
        self.root = root.ensure()
        self.registry_options = registry
        self.blobs = BlobStore(self.root)
        self.db = Database(self.root.db_path)
        self.records = ImageRecords(self.db, self.blobs)
        self._client: RegistryClient | None = client
        self._client_lock = threading.Lock()

    @property
    def client(self):
        """The registry client, created on first use (local commands never need it)."""
        with self._client_lock:
            if self._client is None:
                from lazyoci.registry import RegistryClient
                self._client = RegistryClient(self.registry_options)
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.db.close()

    def lease(self) -> Lease:
        """For other areas writing blobs: hold the lease before writing, record ownership, release."""
        return self.records.lease()

    def store_owned_blob(self, digest: str, owner: str, *, raw: bytes | None = None, size: int | None = None,
                         fetch: Callable[[], Iterable[bytes]] | None = None) -> None:
        """Store a small blob that `owner` (``soci:<index digest>``) holds against garbage collection:
        `raw` bytes, or the chunks `fetch()` downloads (only if the store lacks it); verified."""
        with self.records.lease() as lease:
            lease.add([digest])
            if not self.blobs.has(digest):
                if raw is not None:
                    self.blobs.put_bytes(raw, digest)
                elif fetch is None:
                    raise StoreError(f"blob {digest} is not stored and nothing fetches it")
                else:
                    writer = self.blobs.writer(digest, size)
                    try:
                        for chunk in fetch():
                            writer.write(chunk)
                        writer.commit()
                    except BaseException:
                        writer.abort()
                        raise
            self.records.add_owner(owner, [digest])

    def record_layer_size(self, layer_digest: str, uncompressed: int) -> None:
        self.records.record_layer_size(layer_digest, uncompressed)

    # --- pull / push ----------------------------------------------------------------------

    def pull(self, ref: str, platform: Platform | None = None, progress: ProgressSink | None = None, *,
             layer_consumer: Callable[[Descriptor], LayerConsumer | None] | None = None,
             skip_layers: Callable[[Descriptor], bool] | None = None,
             snapshotter: str = "overlayfs", all_platforms: bool = False,
             resolved: ResolvedImage | None = None) -> LocalImage:
        """Fetch an image into the store (skipping `skip_layers`), name it `ref`, return it.

        `resolved`: what the caller already resolved `ref` to (`resolve`), so the tag is asked once."""
        from lazyoci.images.pull import PullHooks, Puller

        r = Reference.parse(ref)
        result = Puller(self.client, self.records, progress).run(
            r, platform, all_platforms, PullHooks(layer_consumer, skip_layers), snapshotter, resolved)
        chosen = result.platforms[0]
        if all_platforms and len(result.platforms) > 1:
            want = platform or Platform.host()
            chosen = next((p for p in result.platforms if want.matches(p.platform)), chosen)
        return LocalImage(str(r), result.digest, chosen.manifest, chosen.config, snapshotter)

    def push(self, ref: str, platform: Platform | None = None, progress: ProgressSink | None = None) -> str:
        """Push a local image to the registry its name says; return the pushed top-level digest."""
        from lazyoci.images.push import Pusher
        r = Reference.parse(ref)
        top = self._resolve_top(ref)
        rec = self._content(top)
        return Pusher(self.client, self.records, progress).push(r, rec, platform)

    # --- local lookups --------------------------------------------------------------------

    def _resolve_top(self, ref_or_id: str) -> str:
        try:
            r = Reference.parse(ref_or_id)
        except ReferenceError_:
            r = None
        if r is not None:
            top = self.records.lookup_name(str(r))
            if top:
                return top
            if r.digest and self.records.content(r.digest):
                return r.digest
        if _ID_RE.match(ref_or_id):
            found = self.records.find_by_prefix(ref_or_id)
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise StoreError(f"image ID {ref_or_id!r} is ambiguous ({len(found)} images match)")
        if r is None:
            Reference.parse(ref_or_id)      # re-raise the reference error: it was neither
        raise ImageNotFoundError(f"no such image: {ref_or_id}")

    def _content(self, top: str) -> ContentRecord:
        rec = self.records.content(top)
        if rec is None:
            raise ImageNotFoundError(f"no such image: {top}")
        return rec

    def lookup(self, ref_or_id: str) -> ContentRecord:
        """What the store holds of a local image, by name, digest or ID prefix (every platform)."""
        return self._content(self._resolve_top(ref_or_id))

    def get(self, ref_or_id: str, platform: Platform | None = None) -> LocalImage:
        """A local image by name, digest or ID prefix; its manifest for `platform` (default: host)."""
        top = self._resolve_top(ref_or_id)
        rec = self._content(top)
        manifest_digest = self._pick_platform(ref_or_id, rec, platform)
        manifest = Manifest.parse(self.blobs.read(manifest_digest))
        config = ImageConfig.parse(self.blobs.read(manifest.config.digest))
        try:
            r = Reference.parse(ref_or_id)
            name = str(r) if self.records.lookup_name(str(r)) == top else None
        except ReferenceError_:
            name = None
        if name is None:
            names = self.records.names_of(top)
            name = names[0] if names else None
        return LocalImage(name, top, manifest, config, rec.snapshotter)

    def _pick_platform(self, what: str, rec: ContentRecord, platform: Platform | None) -> str:
        if not rec.platforms:
            raise StoreError(f"image {what} has no platform manifest stored")
        want = platform or Platform.host()
        for manifest, plat, _ in rec.platforms:
            if want.matches(Platform.parse(plat)):
                return manifest
        if platform is None and len(rec.platforms) == 1:
            return rec.platforms[0][0]     # a single-platform image: use it, as docker does
        have = ", ".join(p for _, p, _ in rec.platforms)
        raise ImageNotFoundError(f"image {what} has no {want} platform locally (has: {have})")

    def inspect(self, ref_or_id: str) -> dict:
        """What `image inspect` prints: names, digests, platforms, the manifest and config as stored."""
        import json
        top = self._resolve_top(ref_or_id)
        rec = self._content(top)
        platforms = []
        for manifest, plat, config in rec.platforms:
            platforms.append({
                "Platform": plat, "Manifest": manifest, "Config": config,
                "ManifestJSON": json.loads(self.blobs.read(manifest)),
                "ConfigJSON": json.loads(self.blobs.read(config)),
            })
        return {
            "Id": top, "RepoTags": self.records.names_of(top), "MediaType": rec.media_type,
            "Snapshotter": rec.snapshotter, "Platforms": platforms,
        }

    def list(self) -> list[ImageSummary]:
        rows: list[ImageSummary] = []
        named: set[str] = set()
        names = self.records.names()
        contents = {c.digest: c for c in self.records.contents()}
        for n in names:
            if n.digest in contents:
                named.add(n.digest)
                rows.extend(self._summaries(n.name, contents[n.digest]))
        for digest, rec in contents.items():
            if digest not in named:
                rows.extend(self._summaries(None, rec))
        return rows

    def _summaries(self, name: str | None, rec: ContentRecord) -> builtins.list[ImageSummary]:
        repo, tag = "<none>", "<none>"
        if name:
            r = Reference.parse(name)
            repo = Reference(r.registry, r.repository).familiar()   # docker's short form: ubuntu
            tag = r.tag or "<none>"
        out = []
        top_size = self.blobs.size(rec.digest) or 0 if rec.media_type in mt.IMAGE_INDEXES else 0
        for manifest_digest, plat, config_digest in rec.platforms:
            try:
                manifest = Manifest.parse(self.blobs.read(manifest_digest))
                config = ImageConfig.parse(self.blobs.read(config_digest))
            except LazyociError:
                continue
            sizes = self.records.layer_sizes(l.digest for l in manifest.layers)
            unpacked = sum(sizes.get(l.digest, l.size) for l in manifest.layers)
            blob_size = top_size + len(manifest.raw) + len(config.raw)
            blob_size += sum(self.blobs.size(l.digest) or 0 for l in manifest.layers)
            out.append(ImageSummary(name, repo, tag, rec.digest, plat, manifest_digest, config.created,
                                    unpacked, blob_size, rec.snapshotter))
        return out

    # --- names and removal ----------------------------------------------------------------

    def tag(self, src: str, dst: str) -> None:
        top = self._resolve_top(src)
        name = str(Reference.parse(dst))
        with self.db.transaction() as c:
            released = self.records.point_name(c, name, top)
        if released:
            self.gc()

    def remove(self, ref: str, force: bool = False) -> RemoveResult:
        """Untag `ref` (a name) or every name of an image ID; delete what nothing references."""
        top = self._resolve_top(ref)
        try:
            as_name = str(Reference.parse(ref))
        except ReferenceError_:
            as_name = None
        untagged: list[str] = []
        deleted: list[str] = []
        with self.db.transaction() as c:
            names = self.records.names_in(c, top)
            targets = [as_name] if as_name is not None and as_name in names else names
            if len(targets) > 1 and not force:
                raise StoreError(f"image {ref} is referenced by {len(targets)} names "
                                 f"({', '.join(targets)}): remove them by name, or use -f")
            holders = self.records.other_holders(c, top)
            if holders and len(targets) == len(names) and not force:
                raise StoreError(f"image {ref} is in use by {', '.join(holders)} (use -f to untag anyway)")
            for name in targets:
                self.records.drop_name(c, name)
                untagged.append(name)
            if self.records.release_if_unnamed(c, top):
                deleted.append(top)
        return RemoveResult(tuple(untagged), tuple(deleted), self.gc())

    def prune_unnamed(self) -> tuple[str, ...]:
        """Forget every image no name points at (and nothing else holds); their top digests."""
        removed: tuple[str, ...] = ()
        for rec in self.records.contents():
            if not self.records.names_of(rec.digest):
                with self.db.transaction() as c:
                    if self.records.release_if_unnamed(c, rec.digest):
                        removed += (rec.digest,)
        return removed

    def gc(self) -> GcResult:
        return self.records.gc()

    # --- archives -------------------------------------------------------------------------

    def save(self, path: "Path | BinaryIO", refs: builtins.list[str], platform: Platform | None = None) -> None:
        from lazyoci.images.archive import save_archive
        save_archive(self, path, refs, platform)

    def load(self, path: "Path | BinaryIO", progress: Callable[[str], None] | None = None) -> builtins.list[str]:
        from lazyoci.images.archive import load_archive
        return load_archive(self, path, progress)

    def import_rootfs(self, source: Path, ref: str, changes: tuple[str, ...] = (),
                      platform: Platform | None = None) -> LocalImage:
        from lazyoci.images.importer import import_rootfs
        return import_rootfs(self, source, ref, changes, platform)
