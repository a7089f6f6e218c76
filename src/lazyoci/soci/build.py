"""Build a SOCI index for a local image: one zTOC per large enough layer, then the index.

Layers below the minimum size get no zTOC (fetching them whole is cheaper than
lazily); zstd layers are skipped as the reference skips them. A zTOC already
built for the same layer digest and span size is reused unless `force` (whatever its spans
inside large files: any layout reads the same). zTOCs
of different layers are built in parallel threads (libz calls through ctypes release
the GIL; the tar parsing in Python does not, so the gain depends on the layer).
The lines given to `log` are the reference's, so `push --snapshotter soci` prints
what Finch prints (docs/SOCI-FORMAT-NOTES.md, "The reference's defaults and messages").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from lazyoci.errors import FormatError, IntegrityError, StoreError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.digest import sha256_digest
from lazyoci.oci.manifest import Descriptor, Manifest
from lazyoci.oci.platform import Platform
from lazyoci.oci.whiteout import OPAQUE_MARKER
from lazyoci.soci.index import EMPTY_CONFIG, EMPTY_CONFIG_DIGEST, SociIndex, make_index, ztoc_descriptor
from lazyoci.soci.index_records import SociRecords, ZtocRecord
from lazyoci.soci.verifying_readers import VerifyingReader, buffered

if TYPE_CHECKING:
    from lazyoci.images.service import LocalImage
    from lazyoci.registry.client import RegistryClient
    from lazyoci.ztoc import Ztoc
    from lazyoci.store.blobs import BlobStore
    from lazyoci.store.image_records import Lease

Log = Callable[[str], None]

DEFAULT_SPAN_SIZE = 1 << 22
# Spans inside files of at least this many bytes run up to it (ztoc/span_layout.py): fewer
# 32 KiB windows in the zTOC of a layer of big files, which every lazy pull fetches whole.
DEFAULT_LARGE_SPAN_SIZE = 1 << 24
DEFAULT_MIN_LAYER_SIZE = 10 << 20
# The reference's optional optimisations (`--optimizations`). "xattr": a layer whose zTOC has no
# xattrs and no opaque directory is marked `disable-xattrs`, so lazy mounts answer no xattr lookups.
OPTIMIZATIONS = ("xattr",)


@dataclass(frozen=True)
class SociBuildOptions:
    span_size: int = DEFAULT_SPAN_SIZE
    large_span_size: int = DEFAULT_LARGE_SPAN_SIZE   # spans inside large files; <= span_size: none
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE
    force: bool = False                 # rebuild zTOCs even when one exists for the layer
    version: str = "v1"                 # "v1" (subject, referrers) or "v2" (convert)
    build_tool: str | None = None       # None: lazyoci's own (lazyoci.ztoc.BUILD_TOOL)
    workers: int = 2                    # zTOCs built at once
    optimizations: tuple[str, ...] = ()   # of OPTIMIZATIONS
    prefetch_files: tuple[str, ...] = ()    # paths whose spans the index's prefetch artifacts name

    def __post_init__(self) -> None:
        from lazyoci.errors import ConfigError
        from lazyoci.ztoc.limits import MAX_SPAN_SIZE
        if self.span_size <= 0:
            raise ConfigError(f"span size must be positive, not {self.span_size}")
        if self.span_size > MAX_SPAN_SIZE.value:   # readers (lazyoci's service among them) would refuse it
            raise ConfigError(f"span size {self.span_size} is over lazyoci's limit of {MAX_SPAN_SIZE.value} "
                              f"bytes ({MAX_SPAN_SIZE.name}: {MAX_SPAN_SIZE.why})")
        if not 0 <= self.large_span_size <= MAX_SPAN_SIZE.value:
            raise ConfigError(f"large-file span size must be between 0 and {MAX_SPAN_SIZE.value}, "
                              f"not {self.large_span_size}")
        if self.min_layer_size < 0:
            raise ConfigError(f"min layer size must be >= 0, not {self.min_layer_size}")
        if self.version not in ("v1", "v2"):
            raise ConfigError(f"SOCI index version must be v1 or v2, not {self.version!r}")
        if self.workers < 1:
            raise ConfigError("workers must be >= 1")
        for o in self.optimizations:
            if o not in OPTIMIZATIONS:
                raise ConfigError(f"optimization {o} is not a valid optimization [{' '.join(OPTIMIZATIONS)}]")

    @property
    def tool(self) -> str:
        if self.build_tool is not None:
            return self.build_tool
        from lazyoci.ztoc import BUILD_TOOL
        return BUILD_TOOL


@dataclass(frozen=True)
class LayerZtoc:
    layer: Descriptor
    ztoc: Descriptor        # the index entry (media type application/octet-stream, annotations)
    reused: bool


@dataclass(frozen=True)
class SociIndexResult:
    index: SociIndex
    manifest: Descriptor            # the image manifest indexed (the v1 subject)
    platform: Platform
    ztocs: tuple[LayerZtoc, ...]
    skipped: tuple[Descriptor, ...]

    @property
    def digest(self) -> str:
        return self.index.digest


def layer_compression_or_skip(layer: Descriptor, options: SociBuildOptions, log: Log) -> str | None:
    """The compression to index `layer` with, or None (and the reference's skip line)."""
    if layer.media_type == mt.SOCI_PREFETCH:
        return None
    if not mt.is_layer(layer.media_type):
        raise FormatError(f"image layer {layer.digest} has a media type that is not a layer: {layer.media_type!r}")
    if layer.size < options.min_layer_size:
        log(f"ztoc skipped - layer {layer.digest} ({layer.media_type}) size {layer.size} "
            f"is less than min-layer-size {options.min_layer_size}")
        return None
    compression = mt.layer_compression(layer.media_type)
    if compression not in ("gzip", "none"):
        log(f"ztoc skipped - layer {layer.digest} ({layer.media_type}) is compressed in an unsupported "
            f'format. expect: [tar, gzip, unknown] but got "{compression}"')
        return None
    return compression


def existing_ztoc(blobs: "BlobStore", records: SociRecords, layer: Descriptor,
                  options: SociBuildOptions, lease: "Lease | None" = None) -> Descriptor | None:
    """The recorded zTOC for this layer and span size, if its blob is still present and sound."""
    if options.force:
        return None
    rec = records.find_ztoc(layer.digest, options.span_size)
    if rec is None:
        return None
    if lease is not None:
        lease.add([rec.ztoc_digest])        # before looking: gc must not take it from under us
    if not blobs.has(rec.ztoc_digest):
        return None
    from lazyoci.ztoc import Ztoc
    try:
        z = Ztoc.parse(blobs.read(rec.ztoc_digest))     # read() re-verifies the digest
    except (FormatError, IntegrityError):
        return None                                  # rebuild rather than index with a bad zTOC
    return ztoc_descriptor(rec.ztoc_digest, rec.ztoc_size, layer, options.span_size,
                           _disable_xattrs(z, options))


def _disable_xattrs(ztoc: "Ztoc", options: SociBuildOptions) -> bool:
    """With the xattr optimisation, a layer none of whose entries has an xattr or is an opaque
    directory marker (the reference's test, on the zTOC's entries)."""
    if "xattr" not in options.optimizations:
        return False
    for i in range(len(ztoc)):
        entry = ztoc.entry(i)
        if entry.xattrs or entry.name.endswith(OPAQUE_MARKER):
            return False
    return True


def verified_ztoc(source: BinaryIO | object, layer: Descriptor,
                  build: Callable[[BinaryIO], bytes]) -> tuple[bytes, "Ztoc"]:
    """`build` run over the layer's bytes (a file or an iterator of chunks) as they are checked
    against the layer digest; the zTOC it made, parsed, and refused unless it covers the layer."""
    from lazyoci.ztoc import Ztoc

    reader = VerifyingReader(source, layer.digest, layer.size)   # type: ignore[arg-type]
    data = build(buffered(reader))
    reader.finish()
    z = Ztoc.parse(data)
    if z.compressed_size != layer.size:
        raise FormatError(f"zTOC of layer {layer.digest} covers {z.compressed_size} bytes, "
                          f"the layer has {layer.size}")
    return data, z


def build_layer_ztoc(source: BinaryIO | object, layer: Descriptor, compression: str,
                     options: SociBuildOptions, blobs: "BlobStore", records: SociRecords,
                     lease: "Lease | None" = None) -> Descriptor:
    """Build one zTOC from the layer's bytes (a file or an iterator of chunks), verifying the
    layer digest, then store and record it (under `lease`, so gc leaves it). Returns the index entry."""
    from lazyoci.ztoc import build_ztoc

    data, z = verified_ztoc(source, layer, lambda f: build_ztoc(f, compression, options.span_size, options.tool,
                                                               options.large_span_size))
    digest = sha256_digest(data)
    if lease is not None:
        lease.add([digest])
    blobs.put_bytes(data, digest)
    records.put_ztoc(ZtocRecord(layer.digest, options.span_size, digest, len(data),
                                layer.media_type, layer.size, time.time()))
    return ztoc_descriptor(digest, len(data), layer, options.span_size, _disable_xattrs(z, options))


OpenLayer = Callable[[Descriptor], "BinaryIO | object"]


def build_ztocs(manifest: Manifest, open_layer: OpenLayer, options: SociBuildOptions,
                blobs: "BlobStore", records: SociRecords, log: Log,
                lease: "Lease | None" = None) -> tuple[list[LayerZtoc], list[Descriptor]]:
    """zTOCs for the layers of `manifest`, in layer order; lines logged in layer order."""
    plans: list[tuple[Descriptor, str | None, Descriptor | None]] = []
    for layer in manifest.layers:
        compression = layer_compression_or_skip(layer, options, log)
        reused = existing_ztoc(blobs, records, layer, options, lease) if compression else None
        plans.append((layer, compression, reused))
    built: list[LayerZtoc] = []
    skipped: list[Descriptor] = []

    def job(layer: Descriptor, compression: str) -> Descriptor:
        source = open_layer(layer)
        try:
            return build_layer_ztoc(source, layer, compression, options, blobs, records, lease)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    with ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="ztoc") as pool:
        futures = {}   # a layer the image has twice is built once and listed at both positions
        for layer, compression, reused in plans:
            if compression and reused is None and layer.digest not in futures:
                futures[layer.digest] = pool.submit(job, layer, compression)
        try:
            for layer, compression, reused in plans:
                if not compression:
                    skipped.append(layer)
                elif reused is not None:
                    log(f"layer {layer.digest} -> ztoc {reused.digest} (already exists)")
                    built.append(LayerZtoc(layer, reused, True))
                else:
                    desc = futures[layer.digest].result()
                    log(f"layer {layer.digest} -> ztoc {desc.digest}")
                    built.append(LayerZtoc(layer, desc, False))
        except BaseException:
            for f in futures.values():
                f.cancel()
            raise
    return built, skipped


def build_prefetch_artifacts(blobs: "BlobStore", built: list[LayerZtoc], paths: tuple[str, ...],
                             log: Log, lease: "Lease | None" = None) -> list[Descriptor]:
    """Store a prefetch artifact for each layer holding some of `paths` (soci/prefetch.py);
    returns their index entries, in layer order, as the reference lists them after the zTOCs."""
    if not paths:
        return []
    from lazyoci.soci.prefetch import artifact_descriptor, artifacts_for_files
    from lazyoci.ztoc import Ztoc
    layers = [(b.layer.digest, Ztoc.parse(blobs.read(b.ztoc.digest))) for b in built]
    artifacts = artifacts_for_files(layers, paths, lambda line: log(f"WARN {line}"))
    out = []
    for b in built:
        artifact = artifacts.get(b.layer.digest)
        if artifact is None:
            continue
        desc, raw = artifact_descriptor(artifact, b.layer.digest)
        if lease is not None:
            lease.add([desc.digest])
        blobs.put_bytes(raw, desc.digest)
        log(f"Created prefetch artifact for layer {b.layer.digest}: {desc.digest}")
        out.append(desc)
    return out


def store_index(blobs: "BlobStore", records: SociRecords, index: SociIndex, manifest: Descriptor,
                image_digest: str, image_name: str | None, platform: Platform, origin: str,
                lease: "Lease | None" = None) -> None:
    """The index, its empty config, and the records that tie it to the image manifest and
    make it own its blobs."""
    if lease is not None:
        lease.add([EMPTY_CONFIG_DIGEST, index.digest])
    blobs.put_bytes(EMPTY_CONFIG, EMPTY_CONFIG_DIGEST)
    blobs.put_bytes(index.raw, index.digest)
    records.own(index.digest, {EMPTY_CONFIG_DIGEST, *(d.digest for d in index.ztocs + index.prefetch)})
    records.put_index(index.digest, manifest.digest, image_digest, image_name, str(platform),
                      index.version, index.size, origin)


def layer_source(blobs: "BlobStore", client: "Callable[[], RegistryClient]", image: "LocalImage") -> OpenLayer:
    """Layers from the blob store; a layer left in the registry (lazily pulled image) is
    streamed from the registry the image came from, once, without being stored. `client` is
    called only then, so indexing a fully pulled image never opens a registry client."""
    def open_layer(layer: Descriptor):
        if blobs.has(layer.digest):
            return blobs.open(layer.digest)
        if image.name is None:
            raise StoreError(f"layer {layer.digest} is not in the local store and the image has no "
                             "name to fetch it from; pull it again or use `lazyoci soci create --remote`")
        from lazyoci.oci.reference import Reference
        return client().iter_blob(Reference.parse(image.name), layer.digest, layer.size)
    return open_layer


def build_index(image: "LocalImage", open_layer: OpenLayer, blobs: "BlobStore", records: SociRecords,
                lease: "Lease", options: SociBuildOptions | None = None,
                log: Log = lambda line: None) -> SociIndexResult:
    """Build (or reuse) the zTOCs of a local image and make its SOCI index; store both as blobs.

    The caller holds `lease` until the records are written, so `gc` cannot take the new blobs.
    FormatError when no layer gets a zTOC (an empty index would make nothing lazy).
    """
    options = options or SociBuildOptions()
    manifest = image.manifest
    built, skipped = build_ztocs(manifest, open_layer, options, blobs, records, log, lease)
    mdesc = manifest.descriptor()
    if not built:
        raise FormatError(
            f"no zTOCs created for {image.name or image.digest}: all {len(manifest.layers)} layers are "
            f"smaller than min-layer-size {options.min_layer_size} or compressed with an unsupported "
            "format; lower --min-layer-size to index smaller layers")
    prefetch = build_prefetch_artifacts(blobs, built, options.prefetch_files, log, lease)
    index = make_index(options.version, [b.ztoc for b in built] + prefetch,
                       mdesc if options.version == "v1" else None, options.tool)
    platform = image.config.platform
    store_index(blobs, records, index, mdesc, image.digest, image.name, platform, "built", lease)
    return SociIndexResult(index, mdesc, platform, tuple(built), tuple(skipped))
