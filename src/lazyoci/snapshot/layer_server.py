"""What the soci snapshotter needs from whatever serves its lazy layers.

Today that is the lazyoci service, reached through `service/client.py`'s `ServiceClient`;
the snapshotter and the lazy pull see only this protocol, so a test, another front end
(containerd's gRPC snapshotter) or another server can give them theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

__all__ = ["LayerServer"]


class LayerServer(Protocol):
    """Serves a lazy layer as a view through one index (a zTOC, or a TOC the layer carries):
    a directory, keyed by (layer, index)."""

    def spawn(self) -> None:
        """Start the server in the background if it is not running (returns at once)."""

    def ensure_running(self) -> object:
        """Start the server if needed and wait until it answers."""

    def is_running(self) -> bool: ...

    def mount_layer(self, ref: str, layer_digest: str, index_digest: str) -> Path:
        """Serve the layer's view through `index_digest`, fetching spans from `ref`; its directory."""

    def begin_mount(self, ref: str, layer_digest: str, index_digest: str) -> None:
        """Have the layer's view served, returning once its index is checked (an index that cannot
        be served raises FormatError here, as in `mount_layer`): the view may appear a moment
        later, and `mount_layer` or `unmount_layer` of it waits for that (a lazy pull's mounts)."""

    def view_dir(self, layer_digest: str, index_digest: str) -> Path:
        """Where the view appears once served, served or not."""

    def lower_dir(self, layer_digest: str, index_digest: str) -> Path:
        """The served view's directory to stack overlays on: where it costs the kernel the fewest
        requests (a layer without xattrs is served where the kernel asks for none)."""

    def release_views(self, views: list[tuple[str, str]]) -> None:
        """Stop serving these (layer, index) views, and forget them if the server is down."""

    def recorded_views(self) -> list[tuple[str, str]]:
        """The (layer, index) views the server serves, or serves again when it starts."""

    def unmount_layer(self, layer_digest: str, index_digest: str) -> bool: ...
