"""The lazy layer formats lazyoci serves, in one table: how a layer is recognised, how its
index is fetched and opened.

A layer is served lazily through an index of some kind: a zTOC from the image's SOCI
index ("ztoc"), or an index the layer carries itself ("estargz": its TOC). The pull
picks, per layer, a zTOC if the SOCI index has one, else the first format here whose
`recognises` accepts the layer's descriptor, else it downloads the layer whole. The
service opens a stored index with `open_index` and the format its pull recorded
(the `format` of store/lazy_layer_records.py). A new format is one more `LazyFormat` in FORMATS.
zstd:chunked is here for opening and display; its pull step (zstdchunked/fetch.py, called
from snapshot/soci_pull.py) is still its own, and a view recorded as "ztoc" (the default,
as for every view of an older lazyoci) is told a zTOC or a zstd:chunked TOC by its first
bytes (service/layers.py).

Imports of the formats' modules are deferred: `images` and `ps` read `label` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from lazyoci.errors import FormatError

if TYPE_CHECKING:
    from lazyoci.fs.layer_index import LayerIndex
    from lazyoci.oci.manifest import Descriptor
    from lazyoci.oci.reference import Reference

__all__ = ["FORMATS", "LazyFormat", "format_named", "open_index", "own_format"]


@dataclass(frozen=True)
class LazyFormat:
    name: str                                               # recorded per view; "ztoc", "estargz"
    label: str                                              # what `images`, `ps`, `service status` show
    open: Callable[[bytes, str], "LayerIndex"]              # verified index bytes + their digest -> index
    recognises: Callable[["Descriptor"], bool] | None = None    # a layer that carries its own index
    # (client, reference, layer) -> the index bytes to store, checked against the manifest
    fetch: Callable[[Any, "Reference", "Descriptor"], bytes] | None = None


def _open_ztoc(data: bytes, digest: str) -> "LayerIndex":
    from lazyoci.ztoc import Ztoc
    return Ztoc.parse(data, digest=digest)


def _open_estargz(data: bytes, digest: str) -> "LayerIndex":
    from lazyoci.estargz import EStargzIndex
    return EStargzIndex.parse(data, digest)


def _open_zstd_chunked(data: bytes, digest: str) -> "LayerIndex":
    from lazyoci.zstdchunked import ZstdChunkedToc
    return ZstdChunkedToc.parse(data, digest=digest)


def _is_estargz(layer: "Descriptor") -> bool:
    from lazyoci.estargz.remote import is_estargz
    return is_estargz(layer)


def _fetch_estargz(client: Any, ref: "Reference", layer: "Descriptor") -> bytes:
    from lazyoci.estargz.remote import fetch_index
    return fetch_index(client, ref, layer)[0]


FORMATS: dict[str, LazyFormat] = {f.name: f for f in (
    LazyFormat("ztoc", "soci", _open_ztoc),
    LazyFormat("estargz", "estargz", _open_estargz, _is_estargz, _fetch_estargz),
    # fetched by the pull's own zstd:chunked step (zstdchunked/fetch.py), recorded here for display
    LazyFormat("zstd:chunked", "zstd:chunked", _open_zstd_chunked),
)}


def format_named(name: str) -> LazyFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown lazy layer format {name!r} (known: {', '.join(FORMATS)})") from None


def open_index(name: str, data: bytes, digest: str) -> "LayerIndex":
    """The index of a lazy view from its stored bytes (already checked against `digest`)."""
    return format_named(name).open(data, digest)


def own_format(layer: "Descriptor") -> LazyFormat | None:
    """The format of the index this layer carries itself, if lazyoci reads it (None: no such index)."""
    for f in FORMATS.values():
        if f.recognises is not None and f.recognises(layer):
            return f
    return None
