"""The JSON shape of a SOCI v2 conversion (pure: bytes in, bytes out).

Convert does not touch layers. It rewrites each image manifest to OCI media types
(manifest and config descriptor) and adds `com.amazon.soci.index-digest` to the
manifests that got an index, so those manifests get new digests. Single-platform
images are wrapped in an OCI image index; each SOCI index joins that index's
`manifests` with its platform, artifactType v2 and `com.amazon.soci.image-manifest-digest`
(replacing an earlier v2 index of the same platform). The reference round-trips these
documents through Go's ocispec structs, so fields are written in that order and
unknown fields are dropped, as it does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lazyoci.errors import FormatError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.digest import sha256_digest
from lazyoci.oci.manifest import load_json_object
from lazyoci.oci.platform import Platform
from lazyoci.soci.index import ANN_IMAGE_MANIFEST_DIGEST, ANN_INDEX_DIGEST, SociIndex, go_json

_PLATFORM_KEYS = ("architecture", "os", "os.version", "os.features", "variant", "features")


def go_platform(p: dict[str, Any]) -> dict[str, Any]:
    """ocispec.Platform field order; empty optional fields omitted."""
    out: dict[str, Any] = {"architecture": p.get("architecture", ""), "os": p.get("os", "")}
    for k in _PLATFORM_KEYS[2:]:
        if p.get(k):
            out[k] = p[k]
    return out


def go_descriptor(d: dict[str, Any]) -> dict[str, Any]:
    """ocispec.Descriptor field order: mediaType digest size urls annotations data platform artifactType."""
    out: dict[str, Any] = {"mediaType": d.get("mediaType", ""), "digest": d["digest"], "size": d["size"]}
    for k in ("urls", "annotations", "data"):
        if d.get(k):
            out[k] = d[k]
    if d.get("platform"):
        out["platform"] = go_platform(d["platform"])
    if d.get("artifactType"):
        out["artifactType"] = d["artifactType"]
    return out


def _go_document(doc: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """ocispec.Manifest and ocispec.Index alike: schemaVersion mediaType artifactType, then what
    each holds (`body`), then subject annotations."""
    out: dict[str, Any] = {"schemaVersion": doc.get("schemaVersion", 2)}
    if doc.get("mediaType"):
        out["mediaType"] = doc["mediaType"]
    if doc.get("artifactType"):
        out["artifactType"] = doc["artifactType"]
    out.update(body)
    if doc.get("subject"):
        out["subject"] = go_descriptor(doc["subject"])
    if doc.get("annotations"):
        out["annotations"] = doc["annotations"]
    return out


def go_manifest(m: dict[str, Any]) -> dict[str, Any]:
    """ocispec.Manifest field order: schemaVersion mediaType artifactType config layers subject annotations."""
    # Go marshals a nil slice as null; a manifest always has its layers list.
    return _go_document(m, {"config": go_descriptor(m["config"]),
                            "layers": [go_descriptor(d) for d in m.get("layers") or []]})


def go_index(i: dict[str, Any]) -> dict[str, Any]:
    """ocispec.Index field order: schemaVersion mediaType artifactType manifests subject annotations."""
    return _go_document(i, {"manifests": [go_descriptor(d) for d in i.get("manifests") or []]})


@dataclass(frozen=True)
class PlatformIndex:
    """A v2 SOCI index built for one image manifest (by its digest before conversion)."""

    manifest_digest: str
    platform: Platform
    index: SociIndex


@dataclass(frozen=True)
class ConvertedShape:
    index_raw: bytes                 # the new OCI image index (the converted image's top level)
    manifests: dict[str, bytes]      # new image manifests by their new digest
    renamed: dict[str, str]          # old manifest digest -> new manifest digest

    @property
    def digest(self) -> str:
        return sha256_digest(self.index_raw)


def convert_shape(top_raw: bytes, top_media_type: str, top_platform: Platform | None,
                  manifests: dict[str, bytes], soci: list[PlatformIndex]) -> ConvertedShape:
    """Rewrite an image for SOCI v2.

    `top_raw` is the image's top level (a manifest or an index); `manifests` holds the
    image manifests available locally by digest (others of a multi-platform index are kept
    untouched, as the reference does for platforms that were not pulled); `soci` the
    v2 indexes to attach. `top_platform` is the platform of a single-manifest image.
    """
    if not soci:
        raise FormatError("nothing to convert: no SOCI index was built for any platform")
    if top_media_type in mt.IMAGE_INDEXES:
        oci_index = load_json_object(top_raw, "image index")
        if not isinstance(oci_index.get("manifests"), list):
            raise FormatError("image index lacks manifests")
    elif top_media_type in mt.IMAGE_MANIFESTS:
        if top_platform is None:
            raise FormatError("a single-manifest image needs its platform to be wrapped in an index")
        entry: dict[str, Any] = {"mediaType": top_media_type, "digest": sha256_digest(top_raw),
                                 "size": len(top_raw), "platform": top_platform.to_json()}
        oci_index = {"schemaVersion": 2, "manifests": [entry]}
        manifests = {**manifests, entry["digest"]: top_raw}
    else:
        raise FormatError(f"cannot convert a {top_media_type}")
    # Some registries refuse Docker lists mixed with OCI manifests: all OCI from here on.
    oci_index["mediaType"] = mt.OCI_INDEX
    by_manifest = {p.manifest_digest: p for p in soci}
    new_manifests: dict[str, bytes] = {}
    renamed: dict[str, str] = {}
    soci_entries: list[dict[str, Any]] = []
    entries = [dict(d) for d in oci_index["manifests"]]
    for entry in entries:
        old = entry.get("digest")
        if entry.get("artifactType") or entry.get("mediaType") not in mt.IMAGE_MANIFESTS or old not in manifests:
            continue
        m = load_json_object(manifests[old], f"image manifest {old}")
        if sha256_digest(manifests[old]) != old:
            raise FormatError(f"image manifest bytes do not match {old}")
        m["mediaType"] = mt.OCI_MANIFEST
        m["config"] = {**m["config"], "mediaType": mt.OCI_CONFIG}
        attached = by_manifest.get(old)
        if attached is not None:
            m["annotations"] = {**(m.get("annotations") or {}), ANN_INDEX_DIGEST: attached.index.digest}
        raw = go_json(go_manifest(m))
        new = sha256_digest(raw)
        new_manifests[new] = raw
        renamed[old] = new
        entry.update(mediaType=mt.OCI_MANIFEST, digest=new, size=len(raw))
        # The reference puts the manifest's annotations on its descriptor; descriptor-only
        # annotations (e.g. attestation markers) are kept too so nothing is lost.
        ann = {**(entry.get("annotations") or {}), **(m.get("annotations") or {})}
        if ann:
            entry["annotations"] = ann
        if attached is not None:
            soci_entries.append({
                "mediaType": mt.OCI_MANIFEST, "digest": attached.index.digest, "size": attached.index.size,
                "annotations": {ANN_IMAGE_MANIFEST_DIGEST: new},
                "platform": attached.platform.to_json(), "artifactType": mt.SOCI_INDEX_V2,
            })
    missing = set(by_manifest) - set(renamed)
    if missing:
        raise FormatError(f"SOCI index built for a manifest not in the image: {sorted(missing)[0]}")
    for s in soci_entries:
        plat = Platform.from_json(s["platform"])
        for i, e in enumerate(entries):
            if e.get("artifactType") == mt.SOCI_INDEX_V2 and e.get("platform") \
                    and Platform.from_json(e["platform"]) == plat:
                entries[i] = s
                break
        else:
            entries.append(s)
    oci_index["manifests"] = entries
    return ConvertedShape(go_json(go_index(oci_index)), new_manifests, renamed)
