"""Looking inside zTOCs: `soci ztoc info` (JSON summary) and `soci ztoc get-file`.

get-file decompresses only the spans that hold the file, from the layer in the
local store or, when the layer was never downloaded, with Range requests to the
image's registry; every span is verified against its digest in the zTOC.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lazyoci.errors import FormatError, StoreError

if TYPE_CHECKING:
    from lazyoci.registry.client import RegistryClient
    from lazyoci.soci.index_records import SociRecords
    from lazyoci.store.blobs import BlobStore
    from lazyoci.ztoc import Ztoc


def span_of(z: "Ztoc", offset: int, starts: list[int] | None = None) -> int:
    """The span holding uncompressed `offset` (the last span for offsets at or past the end),
    as the reference's UncompressedOffsetToSpanID computes it."""
    starts = starts if starts is not None else [z.span_uncompressed_range(i)[0] for i in range(z.num_spans)]
    return max(0, bisect.bisect_right(starts, offset) - 1)


def ztoc_info(data: bytes) -> dict[str, Any]:
    """The reference's `ztoc info` fields: version, build tool, sizes, spans, files with spans."""
    from lazyoci.ztoc import Ztoc

    z = Ztoc.parse(data)
    starts = [z.span_uncompressed_range(i)[0] for i in range(z.num_spans)]
    files = []
    multi = 0
    for i in range(len(z)):
        e = z.entry(i)
        first = span_of(z, e.offset, starts)
        last = span_of(z, e.offset + e.size, starts)
        multi += first != last
        files.append({"filename": e.name, "offset": e.offset, "size": e.size, "type": e.type,
                      "start_span": first, "end_span": last})
    return {
        "version": z.version, "build_tool": z.build_tool, "size": len(data),
        "compressed_archive_size": z.compressed_size, "uncompressed_archive_size": z.uncompressed_size,
        "compression": z.compression, "span_size": z.span_size, "num_spans": z.num_spans,
        "num_files": len(z), "num_multi_span_files": multi, "files": files,
    }


def _clean(name: str) -> str:
    name = name.strip("/")
    while name.startswith("./"):
        name = name[2:]
    return name


def get_file(blobs: "BlobStore", records: "SociRecords", client: "Callable[[], RegistryClient]",
             ztoc_digest: str, path: str, ref: str | None = None) -> bytes:
    """The bytes of regular file `path` in the layer that zTOC `ztoc_digest` indexes: from the
    layer in `blobs`, else through `client()` (made only then) from the registry of `ref`."""
    from lazyoci.oci.reference import Reference
    from lazyoci.ztoc import Ztoc, read_range

    z = Ztoc.parse(blobs.read(ztoc_digest))
    want = _clean(path)
    entry = None
    for i in range(len(z)):
        e = z.entry(i)
        if _clean(e.name) == want:
            entry = e
    if entry is None:
        raise FormatError(f"no file {path!r} in the layer of zTOC {ztoc_digest}")
    if entry.type != "reg":
        raise FormatError(f"{path!r} is a {entry.type} entry, not a regular file")
    if entry.size == 0:
        return b""
    recs = records.ztocs(ztoc_digest)
    layer = recs[0].layer_digest if recs else None
    if layer is not None and blobs.has(layer):
        with blobs.open(layer) as f:
            def fetch(start: int, end: int) -> bytes:
                f.seek(start)
                return f.read(end - start)
            return read_range(z, fetch, entry.offset, entry.offset + entry.size)
    if ref is None or layer is None:
        raise StoreError(f"the layer of zTOC {ztoc_digest} is not stored locally"
                         + ("; give --ref IMAGE to read its spans from the registry" if layer else
                            " and no layer is recorded for it"))
    r = Reference.parse(ref)
    registry = client()
    return read_range(z, lambda start, end: registry.fetch_range(r, layer, start, end),
                      entry.offset, entry.offset + entry.size)
