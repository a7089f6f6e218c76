"""The snapshotter model (containerd's): committed layer snapshots keyed by chain ID,
active (writable) and view (read-only) snapshots on top of them, and mounts.

Kinds: "committed" (an immutable layer stack named by its chain ID), "active"
(a writable upper layer: a container's rootfs) and "view" (read-only, e.g. `image mount`).

Besides containerd's calls, a lazyoci snapshotter offers `pull` (fetch an image
its own way: overlayfs unpacks while downloading, soci fetches lazily),
`unpack_image` (make the committed snapshots of an image's layers exist; returns
the top key: the chain ID, which soci extends with the zTOCs of lazy layers), `layer_consumer` (the ImageService.pull hook that unpacks while
bytes arrive) and `release_unused`, so that `run` and `image mount` can use any
snapshotter by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lazyoci.images.progress import ProgressSink
    from lazyoci.images.service import ImageService, LayerConsumer, LocalImage
    from lazyoci.oci.platform import Platform
    from lazyoci.oci.manifest import Descriptor

KIND_COMMITTED = "committed"
KIND_ACTIVE = "active"
KIND_VIEW = "view"

LABEL_LAYER_DIGEST = "containerd.io/snapshot/layer.digest"
LABEL_DIFF_ID = "containerd.io/uncompressed"


@dataclass(frozen=True)
class Mount:
    """One mount to perform, like containerd's mount.Mount (type "overlay" or "bind")."""

    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class SnapshotInfo:
    key: str
    kind: str
    parent: str | None
    labels: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    created: float = 0.0


class Snapshotter(Protocol):
    name: str

    def prepare(self, key: str, parent: str | None, labels: dict[str, str] | None = None) -> list[Mount]: ...
    def view(self, key: str, parent: str | None, labels: dict[str, str] | None = None) -> list[Mount]: ...
    def mounts(self, key: str) -> list[Mount]: ...
    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None: ...
    def remove(self, key: str) -> None: ...
    def stat(self, key: str) -> SnapshotInfo: ...
    def walk(self) -> Iterator[SnapshotInfo]: ...

    # lazyoci extensions, used by `run` and `image mount`:
    def pull(self, images: "ImageService", ref: str, platform: "Platform | None" = None,
             progress: "ProgressSink | None" = None,
             index_digest: str | None = None,                      # SOCI index to use (soci only)
             log: "Callable[[str], None] | None" = None) -> "LocalImage": ...   # INFO lines (soci only)
    def unpack_image(self, images: "ImageService", image: "LocalImage") -> str | None: ...
    def layer_consumer(self, desc: "Descriptor") -> "LayerConsumer | None": ...
    def release_unused(self, keep: set[str]) -> list[str]: ...
