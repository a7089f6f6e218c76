"""The one operation of the image service the SOCI functions need: finding a local image."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lazyoci.images.service import LocalImage
    from lazyoci.oci.platform import Platform

__all__ = ["LocalImages"]


class LocalImages(Protocol):
    """A local image by name, digest or ID prefix, with its manifest for `platform`
    (default: the host's); ImageNotFoundError if there is none. `ImageService` is one."""

    def get(self, ref_or_id: str, platform: "Platform | None" = None) -> "LocalImage": ...
