"""Snapshotters by name: what `--snapshotter` and the config's `snapshotters` select."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lazyoci.config import SNAPSHOTTERS, Config
from lazyoci.errors import ConfigError
from lazyoci.store.layout import DataRoot

if TYPE_CHECKING:
    from collections.abc import Callable

    from lazyoci.images.progress import ProgressSink
    from lazyoci.images.service import ImageService, LocalImage
    from lazyoci.oci.platform import Platform
    from lazyoci.registry.client import RegistryClient
    from lazyoci.snapshot.base import Snapshotter
    from lazyoci.snapshot.layer_server import LayerServer


def get_snapshotter(name: str, root: DataRoot, config: Config,
                    client: "RegistryClient | None" = None, server: "LayerServer | None" = None) -> Snapshotter:
    """The snapshotter called `name` for this data root. A lazy one (soci, stargz) pulls
    through `client`, so a caller that pulls with it gives one, and has its layers served by
    `server` (default: the lazyoci service, through its control socket); overlayfs pulls
    through the image service alone."""
    if name == "overlayfs":
        from lazyoci.snapshot.overlay import OverlaySnapshotter

        return OverlaySnapshotter(root, sync_fs=config.unpack_sync_fs)
    if name == "soci":
        try:
            from lazyoci.snapshot.soci import SociSnapshotter
        except ImportError:
            raise ConfigError("the soci snapshotter is not available in this build") from None
        return SociSnapshotter(root, config, client=client, server=server)
    if name == "stargz":
        from lazyoci.snapshot.soci import StargzSnapshotter

        return StargzSnapshotter(root, config, client=client, server=server)
    raise ConfigError(f"unknown snapshotter {name!r} (supported: {', '.join(SNAPSHOTTERS)})")


def pull_image(images: "ImageService", ref: str, platform: "Platform | None", snapshotter: str, config: Config,
               progress: "ProgressSink | None" = None, *, all_platforms: bool = False,
               index_digest: str | None = None, log: "Callable[[str], None] | None" = None,
               server: "LayerServer | None" = None) -> "LocalImage":
    """`lazyoci pull`: fetch the image and prepare its layers for `snapshotter`, which pulls its own
    way (overlayfs unpacks layers while they download; soci mounts indexed layers lazily and
    downloads the rest, or all without an index). The CLI runs it, or the service for the CLI
    (`server`: its own layers)."""
    snap = get_snapshotter(snapshotter, images.root, config, images.client, server)
    if not all_platforms:
        return snap.pull(images, ref, platform, progress=progress, index_digest=index_digest, log=log)
    if snapshotter != "overlayfs" or index_digest:
        raise ConfigError("--all-platforms stores every platform's content; use it with --snapshotter overlayfs")
    image = images.pull(ref, platform, progress, layer_consumer=snap.layer_consumer, snapshotter=snapshotter,
                        all_platforms=True)
    snap.unpack_image(images, image)
    return image


def release_unused_snapshots(root: DataRoot, config: Config, keep: set[str]) -> None:
    """Every snapshotter releases the snapshots (and unpacked layers, lazy views) that no key
    of `keep` (chain IDs of the images that remain) needs: garbage collection across them."""
    for name in SNAPSHOTTERS:
        get_snapshotter(name, root, config).release_unused(keep)
