"""The lazy pull's second source of layer indexes: the ones layers carry themselves.

A layer without a zTOC in the image's SOCI index may still be lazy: an eStargz layer
carries its own TOC (layer_formats.py lists the formats read). For each such layer
this fetches the index from the registry, checks it against the manifest (a TOC
digest annotation) and stores it as a blob; the lazy pull records it with its format
(store/lazy_layer_records.py). A layer whose index cannot be read or does not match is
downloaded whole: `refuse` gets why, the pull says it in its one INFO line, and goes on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from lazyoci.errors import LazyociError
from lazyoci.oci.digest import Digest
from lazyoci.oci.manifest import Descriptor
from lazyoci.oci.reference import Reference

if TYPE_CHECKING:
    from lazyoci.registry.client import RegistryClient

__all__ = ["CHUNKED_OWNER_PREFIX", "OWNER_PREFIX", "OWNER_KINDS", "OwnedBlobStore", "fetch_own_indexes"]

OWNER_PREFIX = "layer-index:"     # blob_refs owner of a layer's own index: layer-index:<layer digest>
CHUNKED_OWNER_PREFIX = "zstd-chunked:"    # the same for a zstd:chunked TOC (its pull step is its own)
OWNER_KINDS = ("layer-index", "zstd-chunked")   # the soci snapshotter releases them with the layer's last view


class OwnedBlobStore(Protocol):
    """Stores a verified blob held by an owner against garbage collection (ImageService)."""

    def store_owned_blob(self, digest: str, owner: str, *, raw: bytes | None = None, size: int | None = None,
                         fetch: "Callable[[], Iterable[bytes]] | None" = None) -> None: ...


def fetch_own_indexes(client: "RegistryClient", store: OwnedBlobStore, reference: Reference,
                      layers: Iterable[Descriptor], refuse: Callable[[str], None]) -> dict[str, tuple[str, str]]:
    """layer digest -> (index digest, format name) for the layers whose own index is stored now;
    `refuse` gets a phrase for each index that cannot be used."""
    from lazyoci.layer_formats import own_format

    out: dict[str, tuple[str, str]] = {}
    for layer in layers:
        fmt = own_format(layer)
        if fmt is None or fmt.fetch is None or layer.digest in out:
            continue
        try:
            data = fmt.fetch(client, reference, layer)
            digest = str(Digest.parse("sha256:" + hashlib.sha256(data).hexdigest()))
            store.store_owned_blob(digest, OWNER_PREFIX + layer.digest, raw=data)
        except LazyociError as e:
            refuse(f"the {fmt.name} index of layer {layer.digest} cannot be used ({e})")
            continue
        out[layer.digest] = (digest, fmt.name)
    return out
