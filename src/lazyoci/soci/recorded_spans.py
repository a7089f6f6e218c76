"""A recorded run's zTOC: the layer indexed again, its spans laid out around what the run read.

`lazyoci soci optimize` records the byte ranges a workload reads from each lazy layer. With
the zTOC the image was indexed with, its prefetch would name every span those reads touch, and
a span is fetched, checked and inflated whole: on python-ml, whose start pages large libraries in
at scattered offsets, 170 MB of spans (526 MiB inflated) for 183 MiB of reads. Here a gzip
layer is indexed again with `span_layout.recorded_span_end`: spans cover the runs of recorded
reads, at most the index's span size each, and the stretches no read touched are spans of up to
UNREAD_SPAN_FACTOR times it, which the prefetch never names. The same reads then touch about half
the compressed bytes, and the zTOC has fewer 32 KiB windows (bench/README.md). Reads off the
recorded path cost more where they land in a long unread span; the limits on spans hold
(ztoc/limits.py), and the reference reads any span layout.

The layer's bytes come from `source`, checked against its digest as they are indexed (a layer
that does not match is an IntegrityError, and nothing is stored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Sequence

from lazyoci.oci.digest import sha256_digest
from lazyoci.soci.build import DEFAULT_SPAN_SIZE, verified_ztoc
from lazyoci.soci.index import ANN_DISABLE_XATTRS, annotated_span_size, ztoc_descriptor

if TYPE_CHECKING:
    from lazyoci.fs.layer_index import LayerIndex
    from lazyoci.oci.manifest import Descriptor
    from lazyoci.store.blobs import BlobStore

UNREAD_SPAN_FACTOR = 4      # an unread stretch's spans: up to 4 times the span size (16 MiB at 4 MiB)


@dataclass(frozen=True)
class RecordedZtoc:
    ztoc: "Descriptor"          # the new zTOC's entry in the index
    spans: list[int]            # its spans the run read, in the order the run first read them
    span_count: int             # spans in the new zTOC


def spans_in_read_order(index: "LayerIndex", reads: Sequence[tuple[int, int]]) -> list[int]:
    """The spans of `index` that the byte ranges `reads` touch, in the order first touched."""
    order: dict[int, None] = {}
    for start, end in reads:
        if end > start:
            order.update(dict.fromkeys(index.spans_for(start, end)))
    return list(order)


def rebuild_for_reads(source: "BinaryIO | object", layer: "Descriptor", old: "Descriptor",
                      reads: Sequence[tuple[int, int]], blobs: "BlobStore") -> RecordedZtoc:
    """Index the gzip `layer` (its bytes from `source`) with spans laid out around `reads`, with the
    span size and xattr marking of its old zTOC entry `old` (FormatError if that span size is no
    size, as `SociIndex.parse` refuses it); store the zTOC in `blobs`."""
    from lazyoci.ztoc import build_ztoc
    from lazyoci.ztoc.limits import MAX_SPAN_SIZE
    from lazyoci.ztoc.span_layout import recorded_span_end

    span_size = annotated_span_size(old) or DEFAULT_SPAN_SIZE
    unread = min(span_size * UNREAD_SPAN_FACTOR, MAX_SPAN_SIZE.value)
    data, z = verified_ztoc(source, layer, lambda f: build_ztoc(
        f, "gzip", span_size, span_end=recorded_span_end(reads, span_size, unread)))
    digest = sha256_digest(data)
    blobs.put_bytes(data, digest)
    desc = ztoc_descriptor(digest, len(data), layer, span_size,
                           old.annotations.get(ANN_DISABLE_XATTRS) == "true")
    return RecordedZtoc(desc, spans_in_read_order(z, reads), z.num_spans)
