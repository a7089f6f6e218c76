"""Snapshotters by name: what `--snapshotter` and the config's `snapshotters` select."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lazyoci.config import SNAPSHOTTERS, Config
from lazyoci.errors import ConfigError
from lazyoci.snapshot.base import Snapshotter
from lazyoci.store.layout import DataRoot

if TYPE_CHECKING:
    from lazyoci.registry.client import RegistryClient


def get_snapshotter(name: str, root: DataRoot, config: Config,
                    client: "RegistryClient | None" = None) -> Snapshotter:
    """The snapshotter called `name` for this data root. A lazy one (soci, stargz) pulls
    through `client`, so a caller that pulls with it gives one; overlayfs pulls through the
    image service alone."""
    if name == "overlayfs":
        from lazyoci.snapshot.overlay import OverlaySnapshotter

        return OverlaySnapshotter(root)
    if name == "soci":
        try:
            from lazyoci.snapshot.soci import SociSnapshotter
        except ImportError:
            raise ConfigError("the soci snapshotter is not available in this build") from None
        return SociSnapshotter(root, config, client=client)
    if name == "stargz":
        from lazyoci.snapshot.soci import StargzSnapshotter

        return StargzSnapshotter(root, config, client=client)
    raise ConfigError(f"unknown snapshotter {name!r} (supported: {', '.join(SNAPSHOTTERS)})")


def release_unused_snapshots(root: DataRoot, config: Config, keep: set[str]) -> None:
    """Every snapshotter releases the snapshots (and unpacked layers, lazy views) that no key
    of `keep` (chain IDs of the images that remain) needs: garbage collection across them."""
    for name in SNAPSHOTTERS:
        get_snapshotter(name, root, config).release_unused(keep)
