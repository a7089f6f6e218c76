"""Hostile zTOCs and SOCI indexes built with lazyoci's own codec from real layers.

Each zTOC here is what an attacker could push as a referrer: span digests and
checkpoints are real (built from the layer's bytes), only what the caps of
lazyoci.ztoc.limits refuse is changed. The builder behind `build_ztoc` refuses
span sizes over the cap, so `ztoc_parts` runs the same stages itself.
"""

from __future__ import annotations

import hashlib
import io
import struct
import urllib.request
from dataclasses import dataclass
from typing import Callable

from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import Descriptor
from lazyoci.oci.reference import Reference
from lazyoci.registry import RegistryClient
from lazyoci.soci.index import (ANN_BUILD_TOOL, EMPTY_CONFIG, EMPTY_CONFIG_DIGEST, descriptor_json,
                                go_json, ztoc_descriptor)
from lazyoci.ztoc.codec import GZIP, ZTOC_TOC, FlatReader, encode_ztoc
from lazyoci.ztoc.toc import TarEntry, TocBuilder
from lazyoci.ztoc.zinfo import GzipIndexer, encode_checkpoints

from helpers.images import Layer


@dataclass(frozen=True)
class ZtocParts:
    """What a zTOC of a gzip layer is made of, to assemble changed zTOCs from."""

    blob: bytes
    usize: int
    entries: list[TarEntry]
    digests: list[str]
    points: list[tuple[int, int, int, bytes]]
    span_size: int

    def encode(self, entries: list[TarEntry] | None = None, span_size: int | None = None) -> bytes:
        return encode_ztoc(build_tool="hostile", compressed_size=len(self.blob), uncompressed_size=self.usize,
                           entries=self.entries if entries is None else entries, algorithm=GZIP,
                           span_digests=self.digests,
                           checkpoints=encode_checkpoints(span_size or self.span_size, self.points))

    def one_span(self) -> bytes:
        """The same layer as ONE span (checkpoints after the first dropped, its digest recomputed):
        the span covers the whole layer whatever the declared span size says."""
        cin, _out, bits, _w = self.points[0]
        digest = "sha256:" + hashlib.sha256(self.blob[cin - (1 if bits else 0):]).hexdigest()
        return encode_ztoc(build_tool="hostile", compressed_size=len(self.blob), uncompressed_size=self.usize,
                           entries=self.entries, algorithm=GZIP, span_digests=[digest],
                           checkpoints=encode_checkpoints(self.span_size, self.points[:1]))


def ztoc_parts(blob: bytes, span_size: int) -> ZtocParts:
    """Build a gzip layer's zTOC parts at any span size (as build_ztoc does, without its cap)."""
    toc = TocBuilder()
    idx = GzipIndexer(span_size, toc.feed)
    try:
        idx.feed(blob)
        idx.finish()
    finally:
        idx.close()
    return ZtocParts(blob, idx.totout, toc.finish(), idx.digests, idx.points, span_size)


def renamed(parts: ZtocParts, old: bytes, new: bytes) -> bytes:
    """The zTOC with entry `old` named `new` (a name the tar does not have)."""
    entries = [e._replace(name=new) if e.name == old else e for e in parts.entries]
    assert entries != parts.entries, f"no entry {old!r}"
    return parts.encode(entries)


def claiming_entries(ztoc: bytes, count: int) -> bytes:
    """The zTOC with its entry vector claiming `count` entries (padded so the vector fits)."""
    r = FlatReader(ztoc, "zTOC")
    toc = r.table(r.deref(r.field(r.root(), ZTOC_TOC, 4)))
    vec = r.deref(r.field(toc, 0, 4))
    out = bytearray(ztoc)
    struct.pack_into("<I", out, vec, count)
    out += bytes(max(0, vec + 4 + 4 * count - len(out)))
    return bytes(out)


def _manifest(registry_host: str, repo: str) -> tuple[bytes, str]:
    req = urllib.request.Request(f"http://{registry_host}/v2/{repo}/manifests/latest",
                                 headers={"Accept": mt.OCI_MANIFEST})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
    return raw, "sha256:" + hashlib.sha256(raw).hexdigest()


def push_index_with(registry_host: str, repo: str, layers: list[Layer], ztocs: dict[str, bytes],
                    claimed_sizes: dict[str, int] | None = None,
                    annotations: dict[str, dict[str, str]] | None = None) -> str:
    """Push a v1 SOCI index for the image `repo:latest` with the given zTOC bytes per layer digest,
    as a referrer; a layer in `claimed_sizes` gets that size in its descriptor instead of the real
    one, a layer in `annotations` those annotations added to its zTOC descriptor. Written without
    lazyoci's index parser, which refuses such indexes. Returns its digest."""
    client = RegistryClient()
    ref = Reference.parse(f"{registry_host}/{repo}:latest")
    raw, digest = _manifest(registry_host, repo)
    descs = []
    for layer in layers:
        data = ztocs.get(layer.digest)
        if data is None:
            continue
        zd = "sha256:" + hashlib.sha256(data).hexdigest()
        client.push_blob(ref, zd, len(data), lambda data=data: io.BytesIO(data))
        layer_desc = Descriptor(layer.media_type, layer.digest, len(layer.blob))
        d = descriptor_json(ztoc_descriptor(zd, len(data), layer_desc, 1 << 22))
        d["size"] = (claimed_sizes or {}).get(layer.digest, len(data))
        d["annotations"].update((annotations or {}).get(layer.digest, {}))
        descs.append(d)
    client.push_blob(ref, EMPTY_CONFIG_DIGEST, len(EMPTY_CONFIG), lambda: io.BytesIO(EMPTY_CONFIG))
    index = go_json({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.SOCI_INDEX_V1, "digest": EMPTY_CONFIG_DIGEST, "size": 2},
        "layers": descs,
        "subject": {"mediaType": mt.OCI_MANIFEST, "digest": digest, "size": len(raw)},
        "annotations": {ANN_BUILD_TOOL: "hostile"},
    })
    index_digest = "sha256:" + hashlib.sha256(index).hexdigest()
    client.put_manifest(ref.with_digest(index_digest), index, mt.OCI_MANIFEST)
    client.add_referrer(ref, digest, Descriptor(mt.OCI_MANIFEST, index_digest, len(index),
                                                artifact_type=mt.SOCI_INDEX_V1))
    client.close()
    return index_digest


Edit = Callable[[list[TarEntry]], list[TarEntry]]


def edited_ztoc(blob: bytes, span_size: int, edit: Edit | None = None) -> bytes:
    """lazyoci's zTOC of a gzip layer, with `edit` applied to its entries before encoding
    (real span digests and checkpoints: only the entries lie)."""
    toc = TocBuilder()
    idx = GzipIndexer(span_size, toc.feed)
    try:
        for i in range(0, len(blob), 1 << 20):
            idx.feed(blob[i:i + (1 << 20)])
        idx.finish()
    finally:
        idx.close()
    entries = toc.finish()
    if edit is not None:
        entries = edit(entries)
    return encode_ztoc(build_tool="test", compressed_size=idx.totin, uncompressed_size=idx.totout,
                       entries=entries, algorithm=GZIP, span_digests=idx.digests,
                       checkpoints=encode_checkpoints(span_size, idx.points))


def swapped_offsets(first: bytes, second: bytes) -> Edit:
    """An edit that swaps the data offsets of two entries (no overlap: each shows the other's bytes)."""
    def edit(entries: list[TarEntry]) -> list[TarEntry]:
        a = next(i for i, e in enumerate(entries) if e.name == first)
        b = next(i for i, e in enumerate(entries) if e.name == second)
        entries[a], entries[b] = entries[a]._replace(offset=entries[b].offset), entries[b]._replace(offset=entries[a].offset)
        return entries
    return edit
