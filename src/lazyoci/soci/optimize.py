"""`lazyoci soci optimize`: record what a workload reads and make it the index's prefetch.

The image runs once, lazily, in a data root of its own (under the main root's tmp/): a fresh
service and FUSE mount, so no span cache and no kernel page cache hides a read from the record.
The service notes every span reads touch, in the order they first do (file data and the tar
headers it checks); it hands no READ to the session holder and unpacks no layer for the
container, even one it finds complete (a `soci.cache_dir` shared with the main root). It also
keeps the byte ranges those reads asked for, and each gzip layer is indexed again with its spans
laid out around them (soci/recorded_spans.py; its bytes from the main root's store, or streamed
from the registry, checked against its digest); with `keep_spans`, for an uncompressed layer, or
past the ranges a recording keeps, the image's zTOC stays. The spans the reads touch
become one prefetch artifact per lazy layer, in the order first read (soci/prefetch.py), and a
new SOCI index, those zTOCs plus the artifacts, is pushed beside the image. The image itself is
not changed (eStargz's optimizer converts the image).
A v2 index is named by the image's manifest, so a new one would change the image: refused.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable

from lazyoci.errors import ConfigError, FormatError, StoreError

if TYPE_CHECKING:
    from lazyoci.config import Config
    from lazyoci.images.service import ImageService
    from lazyoci.oci.manifest import Descriptor
    from lazyoci.registry.client import RegistryClient
    from lazyoci.soci.index import SociIndex
    from lazyoci.store.blobs import BlobStore
    from lazyoci.store.image_records import ImageRecords
    from lazyoci.store.layout import DataRoot

Log = Callable[[str], None]
View = tuple[str, str, list[int], list[tuple[int, int]]]    # layer, zTOC, spans read in order, byte ranges
OpenLayer = Callable[["Descriptor"], "BinaryIO | object"]


@dataclass(frozen=True)
class OptimizeResult:
    index: "SociIndex"                   # the new index, pushed
    replaced: str                        # the digest of the index the run used
    exit_code: int                       # the workload's
    spans: dict[str, int]                # layer digest -> spans its artifact names


def optimize(main_root: "DataRoot", config: "Config", open_images: Callable[["DataRoot"], "ImageService"],
             ref: str, command: tuple[str, ...] = (), index_digest: str | None = None,
             log: Log = lambda line: None, keep_spans: bool = False) -> OptimizeResult:
    """Run `ref` (with `command`, or its own) lazily, record its reads, push the optimized index."""
    from lazyoci.service.paths import ServicePaths
    from lazyoci.store.layout import DataRoot

    main_root.tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = DataRoot(Path(tempfile.mkdtemp(prefix="optimize-", dir=main_root.tmp))).ensure()
    try:
        paths = ServicePaths(private)
        paths.ensure()
        paths.records_reads.touch(mode=0o600)    # every READ reaches the service, which records it
        images = open_images(private)
        try:
            code, views = _record(private, config, images, ref, command, index_digest, log)
            layers = None if keep_spans else _layer_source(main_root, images.client, ref)
            return _push_optimized(images.blobs, images.records, images.client, ref, views, code, log, layers)
        finally:
            images.close()
    finally:
        _remove_private_root(private)


def _record(root: "DataRoot", config: "Config", images: "ImageService", ref: str, command: tuple[str, ...],
            index_digest: str | None, log: Log) -> tuple[int, list[View]]:
    """Run the workload in `root`; its exit code and, per lazy view, the spans it read in order
    and the byte ranges it asked for."""
    from lazyoci.runtime.bundle import ProcessOptions
    from lazyoci.runtime.run import ContainerManager, RunOptions
    from lazyoci.service.client import ServiceClient

    manager = ContainerManager(root, config, images)
    opts = RunOptions(image=ref, process=ProcessOptions(args=command), snapshotter="soci", pull="always",
                      soci_index_digest=index_digest)
    service = ServiceClient(root, config.path)
    try:
        rec, runtime = manager.create(opts)
        try:
            log(f"recording the reads of {ref} ({' '.join(rec.command)})")
            code = manager.start(rec, runtime, opts) or 0
            views = [(v[0], v[1], [int(i) for i in v[2]], [(int(a), int(b)) for a, b in v[3]])
                     for v in service.request("read_order")["views"]]
        finally:
            manager.remove(rec.id, force=True)
    finally:
        if service.is_running():
            service.stop(force=True)
    return code, views


def _layer_source(main_root: "DataRoot", client: "RegistryClient", ref: str) -> OpenLayer:
    """A layer's bytes: from the main root's store if it has them, else streamed from `ref`'s registry."""
    from lazyoci.oci.reference import Reference
    from lazyoci.store.blobs import BlobStore

    store = BlobStore(main_root)

    def open_layer(layer: "Descriptor") -> "BinaryIO | object":
        if store.has(layer.digest):
            return store.open(layer.digest)
        return client.iter_blob(Reference.parse(ref), layer.digest, layer.size)
    return open_layer


def _push_optimized(blobs: "BlobStore", image_records: "ImageRecords", client: "RegistryClient", ref: str,
                    views: list[View], code: int, log: Log, layers: OpenLayer | None = None) -> OptimizeResult:
    """The index the run used, with an artifact of each recorded layer instead of its old ones,
    and (with `layers`) each recorded gzip layer's zTOC laid out around the reads; pushed."""
    from lazyoci.oci import mediatypes as mt
    from lazyoci.oci.manifest import Manifest
    from lazyoci.oci.reference import Reference
    from lazyoci.soci.index import SociIndex, make_index
    from lazyoci.soci.prefetch import artifact_descriptor, artifact_for_spans
    from lazyoci.soci.push import push_index
    from lazyoci.soci.recorded_spans import rebuild_for_reads

    owners = image_records.owners_of_kind("soci")
    if len(owners) != 1:
        raise StoreError(f"the recorder's pull of {ref} used {len(owners)} SOCI indexes, not one: "
                         "it did not run lazily")
    old = SociIndex.parse(blobs.read(owners[0].split(":", 1)[1]))
    if old.version != "v1" or old.subject is None:
        raise ConfigError(f"the SOCI index {old.digest} of {ref} is a v2 index, named by the image itself: "
                          "an optimized one would change the image (use a v1 index: `lazyoci soci create`)")
    mine = {d.digest: d for d in old.ztocs}
    image_layers = {d.digest: d for d in Manifest.parse(blobs.read(old.subject.digest)).layers}
    artifacts = []
    rebuilt: dict[str, Descriptor] = {}      # old zTOC digest -> the new zTOC's entry
    spans: dict[str, int] = {}
    for layer, ztoc, order, ranges in views:
        zdesc = mine.get(ztoc)
        if zdesc is None or not order:
            continue
        ldesc = image_layers.get(layer)
        if layers is not None and ranges and ldesc is not None and \
                mt.layer_compression(ldesc.media_type) == "gzip":
            source = layers(ldesc)
            try:
                new = rebuild_for_reads(source, ldesc, zdesc, ranges, blobs)
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
            rebuilt[ztoc] = new.ztoc
            log(f"layer {layer}: zTOC {new.ztoc.digest} with {new.span_count} spans laid out around "
                f"{len(ranges)} reads (was {ztoc})")
            order = new.spans
        desc, raw = artifact_descriptor(artifact_for_spans(order), layer)
        blobs.put_bytes(raw, desc.digest)
        artifacts.append(desc)
        spans[layer] = len(order)
        log(f"layer {layer}: {len(order)} spans read, prefetch artifact {desc.digest}")
    if not artifacts:
        raise FormatError(f"the workload read nothing of the lazy layers of {ref}: no prefetch to record")
    index = make_index("v1", [rebuilt.get(d.digest, d) for d in old.ztocs] + artifacts, old.subject,
                       old.build_tool or "lazyoci")
    blobs.put_bytes(index.raw, index.digest)
    push_index(client, Reference.parse(ref), blobs, index, log, "allow")
    return OptimizeResult(index, old.digest, code, spans)


def _remove_private_root(root: "DataRoot") -> None:
    """Delete the recorder's data root, unless something is still mounted below it."""
    prefix = str(root.path) + "/"
    with open("/proc/self/mountinfo") as f:
        left = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    if left:
        raise StoreError(f"the recorder left mounts behind ({', '.join(left)}); unmount them and remove {root.path}")
    shutil.rmtree(root.path, ignore_errors=True)
