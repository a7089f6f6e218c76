"""system df and system prune: what the data root holds, and what can go.

Five kinds of things take space: images (their blobs and unpacked layers), containers (their
directory and writable layer), the build cache (buildah's storage), and the span caches of lazy
layers. A span cache outlives the image that made it, so that the next image with that layer
starts warm; `prune` removes the caches of layers no stored image has and the service no longer
serves. Sizes are bytes allocated on disk, so sparse span caches count what they hold.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lazyoci.errors import LazyociError
from lazyoci.images.build import build_dir, prune_build_cache
from lazyoci.oci.manifest import ImageConfig, Manifest, chain_ids
from lazyoci.store.image_records import blobs_held_by_kind

if TYPE_CHECKING:
    from lazyoci.config import Config
    from lazyoci.images.service import ImageService
    from lazyoci.runtime.run import ContainerManager

KINDS = ("Images", "Containers", "Build Cache", "Span Cache")
_CACHE_NAME = re.compile(r"^[0-9a-f]{64}(-[0-9a-f]{16})?$")


@dataclass(frozen=True)
class UsageRow:
    """One row of `system df`: docker's TYPE, TOTAL, ACTIVE, SIZE, RECLAIMABLE."""

    kind: str
    total: int
    active: int
    size: int
    reclaimable: int


@dataclass(frozen=True)
class PruneResult:
    containers: tuple[str, ...]        # ids of the stopped containers removed
    untagged: tuple[str, ...]          # image names dropped
    images: tuple[str, ...]            # top-level digests of the images removed
    span_caches: tuple[str, ...]       # layer digests whose span caches were removed
    bytes_freed: int
    volumes: tuple[str, ...] = ()      # anonymous volumes removed (`--volumes`)


@dataclass(frozen=True)
class _Image:
    top: str
    names: tuple[str, ...]
    in_use: bool                       # a container holds it
    blobs: frozenset[str]              # manifests, configs and layers of every platform stored
    layers: frozenset[str]
    diff_ids: frozenset[str]
    chains: frozenset[str]             # chain IDs of every platform's layers


def span_cache_dir(config: Config, root: Path) -> Path:
    """Where the service keeps span caches: the config's `soci.cache_dir`, else <root>/soci/cache."""
    cache_dir = config.soci.cache_dir or root / "soci" / "cache"
    if not cache_dir.is_absolute():
        cache_dir = (config.path.parent if config.path else root) / cache_dir
    return cache_dir


def _images(svc: ImageService) -> list[_Image]:
    out = []
    with svc.db.reading() as c:
        held = blobs_held_by_kind(c, "container")
    for rec in svc.records.contents():
        blobs, layers, diff_ids, chains = {rec.digest}, set(), set(), set()
        for manifest_digest, _plat, config_digest in rec.platforms:
            blobs |= {manifest_digest, config_digest}
            try:
                manifest = Manifest.parse(svc.blobs.read(manifest_digest))
                config = ImageConfig.parse(svc.blobs.read(config_digest))
            except LazyociError:
                continue
            layers |= {l.digest for l in manifest.layers}
            diff_ids |= set(config.diff_ids)
            chains |= set(chain_ids(config.diff_ids))
        out.append(_Image(rec.digest, tuple(svc.records.names_of(rec.digest)), rec.digest in held,
                          frozenset(blobs | layers), frozenset(layers), frozenset(diff_ids), frozenset(chains)))
    return out


def _blob_bytes(svc: ImageService, digests: Iterable[str]) -> int:
    return sum(svc.blobs.size(d) or 0 for d in set(digests))


def _unpacked(svc: ImageService, config: Config, diff_ids: Iterable[str]) -> int:
    """Bytes of the unpacked layers with these diff IDs, in either snapshotter."""
    from lazyoci.snapshot.overlay import OverlaySnapshotter
    from lazyoci.snapshot.soci import SociSnapshotter

    total = 0
    wanted = set(diff_ids)
    for snap in (OverlaySnapshotter(svc.root), SociSnapshotter(svc.root, config)):
        for diff_id in wanted:
            path = snap.unpacked_dir(diff_id)
            if path is not None:
                total += directory_bytes(path)
    return total


def _span_caches(svc: ImageService, config: Config) -> list[tuple[str, Path]]:
    """(layer digest, directory) of every span cache: one per layer and zTOC, named
    `<layer hex>-<16 hex of the zTOC>` (`<layer hex>` alone by earlier versions)."""
    base = span_cache_dir(config, svc.root.path)
    if not base.is_dir():
        return []
    return [(f"sha256:{p.name[:64]}", p) for p in sorted(base.iterdir())
            if p.is_dir() and _CACHE_NAME.match(p.name)]


def _served_layers(svc: ImageService) -> set[str]:
    """Lazy layers the service serves (now, or when it starts again), through any zTOC."""
    from lazyoci.service.view_records import recorded_views

    return {layer for layer, _ztoc in recorded_views(svc.db)}


def disk_usage(svc: ImageService, manager: ContainerManager, config: Config) -> list[UsageRow]:
    """The rows of `system df`, in KINDS order."""
    images = _images(svc)
    active = [i for i in images if i.in_use]
    inactive_blobs = set().union(*(i.blobs for i in images if not i.in_use)) - set().union(*(i.blobs for i in active))
    inactive_diffs = (set().union(*(i.diff_ids for i in images if not i.in_use))
                      - set().union(*(i.diff_ids for i in active)))
    all_blobs = set().union(*(i.blobs for i in images))
    all_diffs = set().union(*(i.diff_ids for i in images))
    rows = [UsageRow("Images", len(images), len(active),
                     _blob_bytes(svc, all_blobs) + _unpacked(svc, config, all_diffs),
                     _blob_bytes(svc, inactive_blobs) + _unpacked(svc, config, inactive_diffs))]

    containers = manager.store.list()
    sizes = {rec.id: _container_bytes(manager, rec) for rec in containers}
    running = [rec for rec in containers if rec.status == "running"]
    rows.append(UsageRow("Containers", len(containers), len(running), sum(sizes.values()),
                         sum(sizes[rec.id] for rec in containers if rec.status != "running")))

    build = directory_bytes(build_dir(svc.root))
    rows.append(UsageRow("Build Cache", _build_images(svc), 0, build, build))

    caches = [(layer, directory_bytes(path)) for layer, path in _span_caches(svc, config)]
    used = set().union(*(i.layers for i in images)) | _served_layers(svc)
    rows.append(UsageRow("Span Cache", len(caches), sum(1 for layer, _ in caches if layer in used),
                         sum(n for _, n in caches), sum(n for layer, n in caches if layer not in used)))
    return rows


def _container_bytes(manager: ContainerManager, rec) -> int:
    """The container's directory (bundle, logs) and its writable layer, not its mounted rootfs."""
    from lazyoci.snapshot.snapshotters import get_snapshotter

    total = directory_bytes(manager.store.dir(rec.id))
    try:
        mounts = get_snapshotter(rec.snapshotter, manager.root, manager.config).mounts(rec.snapshot_key)
    except LazyociError:
        return total
    for m in mounts:
        for option in m.options:
            if option.startswith("upperdir="):
                total += directory_bytes(Path(option.split("=", 1)[1]))
    return total


def _build_images(svc: ImageService) -> int:
    """How many images (base images and cached steps) buildah keeps for this data root."""
    storage = build_dir(svc.root) / "storage" / "vfs-images" / "images.json"
    if not storage.is_file():
        return 0
    import json

    try:
        return len(json.loads(storage.read_text()))
    except (OSError, ValueError):
        return 0


def prune(svc: ImageService, manager: ContainerManager, config: Config, all_images: bool = False,
          volumes: bool = False) -> PruneResult:
    """docker's `system prune [-a] [--volumes]`: stopped containers, unnamed images (-a: every
    image no container uses), anonymous volumes no container uses (--volumes, as docker 23+),
    the build cache, then blobs, unpacked layers and span caches nothing needs."""
    from lazyoci.runtime.volumes import VolumeStore

    freed = 0
    removed_containers = []
    for rec in manager.store.list():
        if rec.status != "running":
            freed += _container_bytes(manager, rec)
            manager.remove(rec.id)
            removed_containers.append(rec.id)
    removed_volumes = VolumeStore(svc.root).prune(include_named=False) if volumes else []
    freed += sum(size for _, size in removed_volumes)

    untagged: list[str] = []
    deleted: list[str] = []
    for image in _images(svc):
        if image.in_use or (image.names and not all_images):
            continue
        with svc.db.transaction() as c:
            for name in image.names:
                svc.records.drop_name(c, name)
                untagged.append(name)
            if svc.records.release_if_unnamed(c, image.top):
                deleted.append(image.top)
    freed += svc.gc().bytes_freed
    freed += release_unused_layers(svc, config)
    build_bytes = directory_bytes(build_dir(svc.root))
    prune_build_cache(svc.root)
    freed += max(0, build_bytes - directory_bytes(build_dir(svc.root)))

    caches: set[str] = set()
    used = set().union(*(i.layers for i in _images(svc))) | _served_layers(svc)
    for layer, path in _span_caches(svc, config):
        if layer not in used:
            freed += directory_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
            caches.add(layer)
    return PruneResult(tuple(removed_containers), tuple(untagged), tuple(deleted), tuple(sorted(caches)), freed,
                       tuple(name for name, _ in removed_volumes))


def release_snapshots(svc: ImageService, config: Config) -> int:
    """Snapshots of images that are gone go too, in every snapshotter (lazy layers are
    unmounted, the layer indexes they alone held are deleted), so that removing an image
    really gives its disk space back; returns the blob bytes freed."""
    from lazyoci.snapshot.snapshotters import release_unused_snapshots

    release_unused_snapshots(svc.root, config, set().union(*(i.chains for i in _images(svc))))
    return svc.gc().bytes_freed


def release_unused_layers(svc: ImageService, config: Config) -> int:
    """`release_snapshots`, returning the bytes freed."""
    before = directory_bytes(svc.root.snapshots)
    blob_bytes = release_snapshots(svc, config)
    return max(0, before - directory_bytes(svc.root.snapshots)) + blob_bytes


def directory_bytes(path: Path) -> int:
    """Bytes allocated under `path`, without crossing into other filesystems (mounted rootfs, FUSE)."""
    try:
        device = os.lstat(path).st_dev
    except OSError:
        return 0
    total = 0
    for dirpath, dirnames, files in os.walk(path):
        for name in list(dirnames):
            try:
                if os.lstat(os.path.join(dirpath, name)).st_dev != device:
                    dirnames.remove(name)
            except OSError:
                dirnames.remove(name)
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total
