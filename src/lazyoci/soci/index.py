"""The SOCI index manifest: create (v1 with subject, v2 without) and parse.

A SOCI index is an OCI image manifest whose config is the 2-byte `{}` blob with
the index's artifact type as media type, and whose layers are the zTOCs (one per
indexed image layer, in image-layer order). The reference serialises it with Go's
encoding/json over an ocispec.Manifest; `go_json` writes the same field order so
that what lazyoci writes reads like what the reference writes (no `artifactType`
field: the reference leaves it out and registries derive it from config.mediaType).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lazyoci.errors import FormatError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.digest import Digest, sha256_digest
from lazyoci.oci.manifest import Descriptor, Manifest
from lazyoci.ztoc.limits import MAX_SPAN_SIZE, MAX_ZTOC_BYTES

ARTIFACT_TYPES = {"v1": mt.SOCI_INDEX_V1, "v2": mt.SOCI_INDEX_V2}
VERSIONS = {v: k for k, v in ARTIFACT_TYPES.items()}

ANN_LAYER_DIGEST = "com.amazon.soci.image-layer-digest"
ANN_LAYER_MEDIA_TYPE = "com.amazon.soci.image-layer-mediaType"
ANN_SPAN_SIZE = "com.amazon.soci.span-size"
ANN_BUILD_TOOL = "com.amazon.soci.build-tool-identifier"
ANN_DISABLE_XATTRS = "com.amazon.soci.disable-xattrs"
# On an image manifest (v2): which SOCI index serves it.
ANN_INDEX_DIGEST = "com.amazon.soci.index-digest"
# On the SOCI index's descriptor inside an OCI image index (v2): which manifest it indexes.
ANN_IMAGE_MANIFEST_DIGEST = "com.amazon.soci.image-manifest-digest"

EMPTY_CONFIG = b"{}"
EMPTY_CONFIG_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def go_json(obj: Any) -> bytes:
    """Compact JSON as Go's encoding/json writes it (HTML characters escaped).

    Callers build dicts in Go's struct field order; map-typed values
    (annotations) are sorted here as Go sorts map keys.
    """
    text = json.dumps(_sort_maps(obj), separators=(",", ":"), ensure_ascii=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode())


def _sort_maps(obj: Any, key: str | None = None) -> Any:
    if isinstance(obj, dict):
        items = sorted(obj.items()) if key == "annotations" else obj.items()
        return {k: _sort_maps(v, k) for k, v in items}
    if isinstance(obj, list):
        return [_sort_maps(v) for v in obj]
    return obj


def descriptor_json(d: Descriptor) -> dict[str, Any]:
    """A descriptor in ocispec.Descriptor field order (mediaType, digest, size, urls,
    annotations, platform, artifactType), as the reference writes it."""
    out: dict[str, Any] = {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
    if d.urls:
        out["urls"] = list(d.urls)
    if d.annotations:
        out["annotations"] = dict(d.annotations)
    if d.platform is not None:
        plat: dict[str, Any] = {"architecture": d.platform.architecture, "os": d.platform.os}
        if d.platform.variant:
            plat["variant"] = d.platform.variant
        out["platform"] = plat
    if d.artifact_type:
        out["artifactType"] = d.artifact_type
    return out


_GO_TRUE = frozenset(("1", "t", "T", "TRUE", "true", "True"))    # what Go's strconv.ParseBool reads as true


def xattrs_disabled(ztoc: Descriptor) -> bool:
    """The index says the layer has no xattrs and no opaque directories (`disable-xattrs`), read as
    the reference reads it: a value strconv.ParseBool takes as true."""
    return ztoc.annotations.get(ANN_DISABLE_XATTRS, "") in _GO_TRUE


def ztoc_descriptor(ztoc_digest: str, ztoc_size: int, layer: Descriptor, span_size: int,
                    disable_xattrs: bool = False) -> Descriptor:
    """The index's entry for one zTOC: which layer it indexes, that layer's media type, the span size."""
    ann = {
        ANN_LAYER_MEDIA_TYPE: layer.media_type,
        ANN_LAYER_DIGEST: layer.digest,
        ANN_SPAN_SIZE: str(span_size),
    }
    if disable_xattrs:
        ann[ANN_DISABLE_XATTRS] = "true"
    return Descriptor(mt.SOCI_LAYER, ztoc_digest, ztoc_size, annotations=ann)


@dataclass(frozen=True)
class SociIndex:
    """A parsed (or freshly made) SOCI index; `raw` are the exact bytes its digest covers."""

    raw: bytes
    version: str                            # "v1" | "v2"
    ztocs: tuple[Descriptor, ...]           # zTOC descriptors, image-layer order (a layer once per position)
    prefetch: tuple[Descriptor, ...]        # prefetch artifacts (read, never written by lazyoci)
    subject: Descriptor | None
    annotations: dict[str, str]

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def artifact_type(self) -> str:
        return ARTIFACT_TYPES[self.version]

    @property
    def build_tool(self) -> str:
        return self.annotations.get(ANN_BUILD_TOOL, "")

    def descriptor(self) -> Descriptor:
        """How a referrers list or an OCI index names this index."""
        return Descriptor(mt.OCI_MANIFEST, self.digest, self.size,
                          annotations=dict(self.annotations), artifact_type=self.artifact_type)

    def ztoc_for_layer(self, layer_digest: str) -> Descriptor | None:
        for d in self.ztocs:
            if d.annotations.get(ANN_LAYER_DIGEST) == layer_digest:
                return d
        return None

    def layer_map(self) -> dict[str, Descriptor]:
        """Image layer digest -> zTOC descriptor."""
        return {d.annotations[ANN_LAYER_DIGEST]: d for d in self.ztocs}

    @classmethod
    def parse(cls, raw: bytes) -> "SociIndex":
        """Parse an index written by lazyoci or by the reference; FormatError if it is not one."""
        m = Manifest.parse(raw)
        if m.media_type != mt.OCI_MANIFEST:
            raise FormatError(f"a SOCI index must be an OCI image manifest, not {m.media_type}")
        version = VERSIONS.get(m.config.media_type)
        if version is None:
            raise FormatError(f"not a SOCI index: config media type {m.config.media_type!r}")
        if m.artifact_type and m.artifact_type != m.config.media_type:
            raise FormatError(f"SOCI index artifactType {m.artifact_type!r} disagrees with its config")
        ztocs, prefetch = [], []
        seen: dict[str, str] = {}       # layer -> its zTOC: the reference lists a layer once per position
        for d in m.layers:
            if d.media_type == mt.SOCI_PREFETCH:
                prefetch.append(d)
                continue
            if d.media_type != mt.SOCI_LAYER:
                raise FormatError(f"SOCI index entry {d.digest} has unexpected media type {d.media_type!r}")
            layer = d.annotations.get(ANN_LAYER_DIGEST)
            if not layer:
                raise FormatError(f"SOCI index entry {d.digest} lacks {ANN_LAYER_DIGEST}")
            Digest.parse(layer)
            if seen.setdefault(layer, d.digest) != d.digest:
                raise FormatError(f"SOCI index has two different zTOCs for layer {layer}")
            # refused here, before anything is downloaded: a reader would refuse the zTOC anyway
            annotated_span_size(d)
            MAX_ZTOC_BYTES.check(d.size, f"the zTOC {d.digest} of layer {layer} in the SOCI index")
            ztocs.append(d)
        if version == "v1" and m.subject is None:
            raise FormatError("a v1 SOCI index must have a subject")
        return cls(raw, version, tuple(ztocs), tuple(prefetch), m.subject, dict(m.annotations))


def annotated_span_size(d: Descriptor) -> int | None:
    """The span size a zTOC's index entry gives (None if it gives none); FormatError unless it is
    a size in ASCII digits from 1 to MAX_SPAN_SIZE (`isdigit` alone takes "²", and `int` refuses
    both that and more than 4,300 digits with a ValueError)."""
    span = d.annotations.get(ANN_SPAN_SIZE)
    if span is None:
        return None
    if not (span.isascii() and span.isdigit() and len(span) <= 20 and int(span) > 0):
        raise FormatError(f"SOCI index entry {d.digest} has an invalid span size {span!r}")
    MAX_SPAN_SIZE.check(int(span), f"the span size of SOCI index entry {d.digest}")
    return int(span)


def make_index(version: str, ztocs: list[Descriptor], subject: Descriptor | None,
               build_tool: str) -> SociIndex:
    """Serialise a new index. v1 carries `subject` (the image manifest); v2 has none.

    Zero zTOCs is an error: such an index would make nothing lazy.
    """
    if version not in ARTIFACT_TYPES:
        raise FormatError(f"unknown SOCI index version {version!r} (v1 or v2)")
    if not ztocs:
        raise FormatError("no zTOCs created: every layer was skipped (below min-layer-size or "
                          "an unsupported compression), so there is no SOCI index to make")
    if version == "v1" and subject is None:
        raise FormatError("a v1 SOCI index needs the image manifest as subject")
    obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": ARTIFACT_TYPES[version], "digest": EMPTY_CONFIG_DIGEST, "size": 2},
        "layers": [descriptor_json(d) for d in ztocs],
    }
    if version == "v1":
        assert subject is not None
        # The reference names the subject by media type, digest and size only.
        obj["subject"] = {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size}
    obj["annotations"] = {ANN_BUILD_TOOL: build_tool}
    return SociIndex.parse(go_json(obj))


def config_descriptor(index: SociIndex) -> Descriptor:
    return Descriptor(index.artifact_type, EMPTY_CONFIG_DIGEST, len(EMPTY_CONFIG))
