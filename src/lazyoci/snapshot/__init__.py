"""Snapshotters keyed by chain ID, as containerd's: `overlayfs` unpacks layers, `soci` serves
them lazily through the service. Both meet the `Snapshotter` protocol.

The names below are imported on first use, so that importing one snapshotter does not load
the other.
"""

from typing import TYPE_CHECKING

from lazyoci.lazy_names import lazy_names

if TYPE_CHECKING:   # what the names are, for type checkers; at run time __getattr__ imports them
    from lazyoci.snapshot.base import Mount, SnapshotInfo, Snapshotter
    from lazyoci.snapshot.layer_server import LayerServer
    from lazyoci.snapshot.overlay import OverlaySnapshotter
    from lazyoci.snapshot.soci import SociSnapshotter

_WHERE = {
    "Mount": "base", "SnapshotInfo": "base", "Snapshotter": "base", "OverlaySnapshotter": "overlay",
    "SociSnapshotter": "soci", "LayerServer": "layer_server",
}

__all__ = [
    "LayerServer", "Mount", "OverlaySnapshotter", "SnapshotInfo", "Snapshotter", "SociSnapshotter",
]


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
