"""The `overlayfs` snapshotter: every layer unpacked once, stacked by the kernel.

All of its mechanism (snapshot records, unpacking, overlay mounts, release) is the
shared one in lazyoci.snapshot.layered; this class names its directory
(<root>/snapshots/overlayfs/) and tables (`overlay_dirs`, `overlay_snapshots`,
`overlay_layer_digests`) and pulls by unpacking every layer while it downloads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lazyoci.errors import ConfigError

from lazyoci.snapshot.layered import ORPHAN_GRACE_SECONDS, LayeredSnapshotter

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService, LocalImage

__all__ = ["ORPHAN_GRACE_SECONDS", "OverlaySnapshotter"]


class OverlaySnapshotter(LayeredSnapshotter):
    name = "overlayfs"
    dir_name = "overlayfs"
    table_prefix = "overlay"
    schema_name = "snapshot_overlayfs"

    def pull(self, images: "ImageService", ref: str, platform=None, progress=None,
             index_digest: str | None = None, log=None) -> "LocalImage":
        """Pull `ref`, unpacking every layer while it downloads, and commit its snapshots
        (`log`: as for soci; overlayfs has nothing to say)."""
        if index_digest:
            raise ConfigError("--soci-index-digest needs --snapshotter soci")
        image = images.pull(ref, platform, progress=progress, layer_consumer=self.layer_consumer,
                            snapshotter=self.name)
        self.unpack_image(images, image)
        return image
