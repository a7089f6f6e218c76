"""The fuzz targets: each feeds one input to a parser lazyoci runs on untrusted bytes.

The property every target checks: an input either parses or raises a
`LazyociError` subclass. Any other exception escapes to the fuzzer and is
reported as a crash; a hang or unbounded memory is caught by libFuzzer's
`-timeout` and `-rss_limit_mb`. Parsed results are walked (entries, spans,
checkpoints, descriptors) so that lazily decoded fields are exercised too.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import zstandard
from pathlib import Path

from lazyoci.config import load_config
from lazyoci.errors import LazyociError
from lazyoci.estargz import EStargzIndex
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import ImageConfig, Index, Manifest, parse_any
from lazyoci.oci.reference import Reference
from lazyoci.snapshot.inflating_reader import ForwardFile
from lazyoci.soci.index import SociIndex
from lazyoci.tar import first_entry, iter_headers
from lazyoci.ztoc.reader import Ztoc
from lazyoci.ztoc.toc import TocBuilder
from lazyoci.ztoc.zinfo import GzipCheckpoints
from lazyoci.zstdchunked.toc import ZstdChunkedToc

_ENTRY_WALK = 2000        # entries and spans walked per input: enough for coverage, bounded in time


def tar_stream(data: bytes) -> None:
    """tar/headers.py through its pull driver (full unpacks, the whole-layer check) and its
    in-memory one (the per-entry header checks), which must give the same first entry."""
    first: object = None
    try:
        for member in iter_headers(ForwardFile(io.BytesIO(data))):
            member.path, member.link, member.data_length, member.xattrs()
            first = member if first is None else first
    except LazyociError as e:
        first = first or type(e)
    try:
        in_memory: object = first_entry(data)
    except LazyociError as e:
        in_memory = type(e)
    if in_memory != first:
        raise AssertionError(f"first_entry gave {in_memory!r}, iter_headers {first!r}")


def toc_builder(data: bytes) -> None:
    """ztoc/toc.py: the streaming TOC builder of zTOC builds, fed in two chunks."""
    cut = data[0] * 7 if data else 0
    builder = TocBuilder()
    builder.feed(data[1:1 + cut])
    builder.feed(memoryview(data)[1 + cut:])
    builder.finish()


def ztoc(data: bytes) -> None:
    """ztoc/reader.py: `Ztoc.parse`, then every lazily decoded entry and span."""
    z = Ztoc.parse(data)
    repr(z)
    for i in range(min(len(z), _ENTRY_WALK)):
        z.entry(i)
    for i in range(min(z.num_spans, _ENTRY_WALK)):
        z.span_digest(i), z.span_compressed_range(i), z.span_uncompressed_range(i)
    z.spans_for(0, z.uncompressed_size)
    points = z.checkpoints
    if points is not None:
        for i in range(min(points.count, _ENTRY_WALK)):
            points.window(i)


def zinfo(data: bytes) -> None:
    """ztoc/zinfo.py: a zinfo checkpoint blob (v1 or v2) on its own; the first 8 bytes give the
    layer's compressed size the checkpoints are checked against."""
    size = int.from_bytes(data[:8], "little", signed=True)
    points = GzipCheckpoints(data[8:], size)
    for i in range(min(points.count, _ENTRY_WALK)):
        points.window(i)


def soci_index(data: bytes) -> None:
    """soci/index.py: a SOCI index manifest (v1 or v2)."""
    index = SociIndex.parse(data)
    index.digest, index.size, index.artifact_type, index.build_tool
    index.descriptor(), index.layer_map()


_MEDIA_TYPES = (None, mt.OCI_MANIFEST, mt.OCI_INDEX, mt.DOCKER_MANIFEST, mt.DOCKER_MANIFEST_LIST)


def manifest(data: bytes) -> None:
    """oci/manifest.py: manifests, indexes and image configs (the first byte picks the parser)."""
    choice, raw = (data[0], data[1:]) if data else (0, data)
    kind = choice % 4
    if kind == 0:
        parsed = parse_any(raw, _MEDIA_TYPES[choice // 4 % len(_MEDIA_TYPES)])
        if isinstance(parsed, Index):
            parsed.image_manifests()
        parsed.digest
    elif kind == 1:
        Manifest.parse(raw).descriptor()
    elif kind == 2:
        Index.parse(raw).image_manifests()
    else:
        config = ImageConfig.parse(raw)
        config.digest, config.platform


def reference(data: bytes) -> None:
    """oci/reference.py: image references as typed by a user or found in a record."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return            # the CLI and the records only ever hand over str
    ref = Reference.parse(text)
    str(ref), ref.name, ref.api_host, ref.object, ref.familiar()


def config_file(data: bytes) -> None:
    """config.py: the YAML config file, from its bytes on disk (in the working directory, which
    the test makes a temporary one)."""
    path = Path.cwd() / "fuzz-config.yaml"
    path.write_bytes(data)
    load_config(path)


def zstd_chunked_toc(data: bytes) -> None:
    """zstdchunked/toc.py: a zstd:chunked TOC's JSON (compressed here, as the layer stores it; the
    first byte picks where the blob's file frames end, in 4 KiB, 0 for unknown), then every entry
    and chunk."""
    data_end = (data[0] << 12) if data and data[0] else None
    index = ZstdChunkedToc.parse(zstandard.ZstdCompressor(level=1).compress(data[1:]), data_end=data_end)
    repr(index)
    for i in range(min(len(index), _ENTRY_WALK)):
        index.entry(i), index.entry_name(i)
    list(index.tree_entries())
    for i in range(min(index.num_spans, _ENTRY_WALK)):
        index.span_digest(i), index.span_compressed_range(i), index.span_uncompressed_range(i)
    index.spans_for(0, index.uncompressed_size)


def estargz(data: bytes) -> None:
    """estargz/: the footer, the TOC member and the TOC of an eStargz layer's tail; then every
    entry, and each span decoded from bytes that are not its own (an IntegrityError, or data
    that matches every chunk digest)."""
    index = EStargzIndex.parse(data)
    repr(index)
    for i in range(min(len(index), _ENTRY_WALK)):
        index.entry(i), index.entry_name(i)
    list(index.tree_entries())
    index.spans_for(0, index.uncompressed_size)
    for i in range(min(index.num_spans, 8)):
        c0, c1 = index.span_compressed_range(i)
        index.span_uncompressed_range(i), index.span_digest(i)
        if c1 - c0 <= 1 << 16:
            index.decompress_span(i, data[:c1 - c0].ljust(c1 - c0, b"\0"))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "tar_stream": tar_stream, "toc_builder": toc_builder, "ztoc": ztoc, "zinfo": zinfo,
    "soci_index": soci_index, "manifest": manifest, "reference": reference, "config_file": config_file,
    "zstd_chunked_toc": zstd_chunked_toc, "estargz": estargz,
}


def run_one(target: Callable[[bytes], None], data: bytes) -> None:
    """The property: parse or a LazyociError; anything else propagates to the fuzzer."""
    try:
        target(data)
    except LazyociError:
        pass
