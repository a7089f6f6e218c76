"""build_ztoc: one pass over a layer blob -> zTOC bytes, memory independent of the layer's size.

The uncompressed archive size recorded is the reference's: where Go's tar reader stops, just
after the end-of-archive blocks; zero padding after them (tar's 10 KiB records) is still in
the spans but not in the archive. zTOCs lazyoci wrote before recorded the whole inflated
stream; readers take either.

The compressed bytes are read in 1 MiB chunks; each chunk is inflated in place
with checkpoints (zinfo.GzipIndexer: zlib-ng or zlib through ctypes), handed
to a worker thread that hashes it into its span's digest, and the
uncompressed output goes straight to the tar header parser. Nothing of the
layer is kept beyond a few chunks and the 32 KiB windows of the checkpoints
(a 628 MiB layer peaks at ~80 MiB RSS, ~45 MiB above the interpreter).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import BinaryIO

from lazyoci.errors import FormatError, UnsupportedCompressionError
from lazyoci.ztoc.codec import GZIP, UNCOMPRESSED, encode_tar_zinfo, encode_ztoc
from lazyoci.ztoc.limits import MAX_SPAN_SIZE
from lazyoci.ztoc.span_layout import large_file_span_end
from lazyoci.ztoc.toc import TocBuilder
from lazyoci.ztoc.zinfo import GzipIndexer, encode_checkpoints

BUILD_TOOL = "lazyoci v0.1.0"
DEFAULT_SPAN_SIZE = 1 << 22
_READ = 1 << 20


def build_ztoc(fileobj: BinaryIO, compression: str, span_size: int = DEFAULT_SPAN_SIZE,
               build_tool: str = BUILD_TOOL, large_span_size: int = 0,
               span_end: Callable[[int], int] | None = None) -> bytes:
    """The zTOC of the layer blob read from `fileobj` ("gzip" or "none"). With `large_span_size`
    above `span_size`, a gzip layer's spans inside files of at least that many bytes run up to it
    (ztoc/span_layout.py); 0 keeps every span at `span_size`. `span_end` (a gzip layer's only)
    lays the spans out instead, as `span_layout.recorded_span_end` does for a recorded run."""
    if compression == "zstd":
        raise UnsupportedCompressionError("zstd layers cannot have a zTOC (SOCI indexes gzip and uncompressed tar layers)")
    if compression not in ("gzip", "none"):
        raise UnsupportedCompressionError(f"unknown layer compression {compression!r} (want gzip or none)")
    if span_size <= 0:
        raise FormatError(f"span size must be positive, not {span_size}")
    MAX_SPAN_SIZE.check(span_size, "the span size")     # readers would refuse the zTOC
    MAX_SPAN_SIZE.check(large_span_size, "the span size inside large files")
    toc = TocBuilder()
    if compression == "gzip":
        if span_end is None and large_span_size > span_size:
            span_end = large_file_span_end(toc, span_size, large_span_size)
        idx = GzipIndexer(span_size, toc.feed, span_end)
        try:
            while chunk := fileobj.read(_READ):
                idx.feed(chunk)
            idx.finish()
        finally:
            idx.close()
        entries = toc.finish()
        return encode_ztoc(build_tool=build_tool, compressed_size=idx.totin, uncompressed_size=toc.archive_size,
                           entries=entries, algorithm=GZIP, span_digests=idx.digests,
                           checkpoints=encode_checkpoints(span_size, idx.points))
    digests: list[str] = []
    h = hashlib.sha256()
    in_span = size = 0
    while chunk := fileobj.read(_READ):
        toc.feed(chunk)
        size += len(chunk)
        view = memoryview(chunk)
        while view:
            take = min(len(view), span_size - in_span)
            h.update(view[:take])
            in_span += take
            view = view[take:]
            if in_span == span_size:
                digests.append("sha256:" + h.hexdigest())
                h, in_span = hashlib.sha256(), 0
    if in_span:
        digests.append("sha256:" + h.hexdigest())
    if size == 0:
        raise FormatError("layer blob is empty, not a tar archive")
    entries = toc.finish()
    return encode_ztoc(build_tool=build_tool, compressed_size=size, uncompressed_size=toc.archive_size,
                       entries=entries, algorithm=UNCOMPRESSED, span_digests=digests,
                       checkpoints=encode_tar_zinfo(span_size, size))
