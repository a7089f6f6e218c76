"""Descriptors, image manifests, indexes and image configs.

Parsed objects keep the exact bytes they came from (`raw`): manifests are
stored and pushed byte for byte, since re-serialising would change digests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lazyoci.errors import FormatError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.digest import Digest, sha256_digest
from lazyoci.oci.platform import Platform


def _text(value: Any, what: str, default: str | None = None) -> str | None:
    """A JSON string field (or its default when absent); FormatError for any other JSON type."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise FormatError(f"{what} is not a string")
    return value


def _texts(value: Any, what: str) -> tuple[str, ...]:
    """A JSON list of strings (absent: empty); a bare string is refused, never split into characters."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"{what} is not a list of strings")
    return tuple(value)


def _text_map(value: Any, what: str) -> dict[str, str]:
    """A JSON object of string values (annotations, labels); absent: empty."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FormatError(f"{what} is not an object of strings")
    return dict(value)


def _object(value: Any, what: str) -> dict[str, Any]:
    """A JSON object field (absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FormatError(f"{what} is not a JSON object")
    return value


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    platform: Platform | None = None
    artifact_type: str | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: Any) -> "Descriptor":
        if not isinstance(obj, dict):
            raise FormatError("descriptor is not a JSON object")
        try:
            media_type = obj["mediaType"]
            digest = obj["digest"]
            size = obj["size"]
        except KeyError as e:
            raise FormatError(f"descriptor lacks {e.args[0]!r}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(media_type, str):
            raise FormatError(f"descriptor {digest!r} has an invalid size or media type")
        if not isinstance(digest, str):
            raise FormatError(f"descriptor digest {digest!r} is not a string")
        Digest.parse(digest)
        plat = obj.get("platform")
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=_text_map(obj.get("annotations"), f"annotations of {digest}"),
            platform=Platform.from_json(plat) if isinstance(plat, dict) else None,
            artifact_type=_text(obj.get("artifactType"), f"artifactType of {digest}"),
            urls=_texts(obj.get("urls"), f"urls of {digest}"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = self.platform.to_json()
        if self.urls:
            out["urls"] = list(self.urls)
        return out


def load_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Parse JSON bytes that must be an object; FormatError naming `what` otherwise."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is not a JSON object")
    return obj


def detect_media_type(raw: bytes, header_type: str | None = None) -> str:
    """The media type of a manifest: its own mediaType field, else the HTTP header, else by shape."""
    obj = load_json_object(raw, "manifest")
    mtype = _text(obj.get("mediaType"), "manifest mediaType") or header_type
    if mtype in mt.ALL_MANIFESTS:
        return mtype
    if "manifests" in obj:
        return mt.OCI_INDEX
    if "layers" in obj and "config" in obj:
        return mt.OCI_MANIFEST
    raise FormatError(f"unsupported manifest media type {mtype!r}")


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker schema 2)."""

    raw: bytes
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str]
    subject: Descriptor | None
    artifact_type: str | None

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    @classmethod
    def parse(cls, raw: bytes, media_type: str | None = None) -> "Manifest":
        obj = load_json_object(raw, "manifest")
        mtype = media_type or detect_media_type(raw)
        if mtype not in mt.IMAGE_MANIFESTS:
            raise FormatError(f"not an image manifest: {mtype}")
        if obj.get("schemaVersion") != 2:
            raise FormatError("manifest schemaVersion is not 2")
        if "config" not in obj or not isinstance(obj.get("layers", []), list):
            raise FormatError("manifest lacks config or layers")
        subj = obj.get("subject")
        return cls(
            raw=raw,
            media_type=mtype,
            config=Descriptor.from_json(obj["config"]),
            layers=tuple(Descriptor.from_json(d) for d in obj.get("layers") or []),
            annotations=_text_map(obj.get("annotations"), "manifest annotations"),
            subject=Descriptor.from_json(subj) if subj else None,
            artifact_type=_text(obj.get("artifactType"), "manifest artifactType"),
        )

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.raw))


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list."""

    raw: bytes
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: dict[str, str]

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    @classmethod
    def parse(cls, raw: bytes, media_type: str | None = None) -> "Index":
        obj = load_json_object(raw, "index")
        mtype = media_type or detect_media_type(raw)
        if mtype not in mt.IMAGE_INDEXES:
            raise FormatError(f"not an image index: {mtype}")
        if not isinstance(obj.get("manifests"), list):
            raise FormatError("index lacks manifests")
        return cls(
            raw=raw,
            media_type=mtype,
            manifests=tuple(Descriptor.from_json(d) for d in obj["manifests"]),
            annotations=_text_map(obj.get("annotations"), "index annotations"),
        )

    def image_manifests(self) -> list[Descriptor]:
        """Entries that are images (not SOCI indexes or other artifacts, not attestations)."""
        out = []
        for d in self.manifests:
            if d.media_type not in mt.ALL_MANIFESTS or d.artifact_type:
                continue
            if d.annotations.get("vnd.docker.reference.type") == "attestation-manifest":
                continue
            out.append(d)
        return out

    def select(self, wanted: Platform) -> Descriptor:
        """The image manifest for `wanted`; FormatError listing what exists otherwise."""
        candidates = self.image_manifests()
        for d in candidates:
            if d.platform and wanted.matches(d.platform):
                return d
        have = ", ".join(str(d.platform) for d in candidates if d.platform) or "none"
        raise FormatError(f"no image for platform {wanted} in index (has: {have})")


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config lazyoci uses; `raw` keeps the rest."""

    raw: bytes
    os: str
    architecture: str
    variant: str | None
    diff_ids: tuple[str, ...]
    env: tuple[str, ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    working_dir: str
    user: str
    created: str | None
    labels: dict[str, str]
    stop_signal: str | None

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)

    @classmethod
    def parse(cls, raw: bytes) -> "ImageConfig":
        obj = load_json_object(raw, "image config")
        _check_config_fields(obj)
        rootfs = obj.get("rootfs") or {}
        diff_ids = rootfs.get("diff_ids") or []
        for d in diff_ids:
            Digest.parse(d)
        cfg = obj.get("config") or {}
        if not isinstance(cfg, dict):
            raise FormatError("image config config is not a JSON object")
        return cls(
            raw=raw,
            os=obj.get("os", ""),
            architecture=obj.get("architecture", ""),
            variant=obj.get("variant"),
            diff_ids=tuple(diff_ids),
            env=_string_list(cfg, "Env"),
            entrypoint=_string_list(cfg, "Entrypoint"),
            cmd=_string_list(cfg, "Cmd"),
            working_dir=_string(cfg, "WorkingDir"),
            user=_string(cfg, "User"),
            created=obj.get("created"),
            labels=dict(cfg.get("Labels") or {}),
            stop_signal=cfg.get("StopSignal"),
        )


def _string_list(cfg: dict[str, Any], key: str) -> tuple[str, ...]:
    """An image config list such as Cmd: a string is refused, as the OCI schema and containerd do
    (iterating it would run each character as an argument)."""
    value = cfg.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"image config {key} is not a list of strings: {json.dumps(value)[:60]}")
    return tuple(value)


def _string(cfg: dict[str, Any], key: str) -> str:
    value = cfg.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FormatError(f"image config {key} is not a string: {json.dumps(value)[:60]}")
    return value


def parse_any(raw: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse manifest bytes of either kind."""
    mtype = detect_media_type(raw, media_type)
    if mtype in mt.IMAGE_INDEXES:
        return Index.parse(raw, mtype)
    return Manifest.parse(raw, mtype)


def canonical_json(obj: Any) -> bytes:
    """The bytes lazyoci writes for manifests it creates itself (stable, compact)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def chain_ids(diff_ids: list[str] | tuple[str, ...]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else sha256_digest(f"{out[-1]} {d}".encode()))
    return out


def _check_config_fields(obj: dict[str, Any]) -> None:
    """The JSON types of an image config's top-level fields, rootfs and labels, so that a
    malformed config is one FormatError rather than whatever a later use of the value raises."""
    rootfs = _object(obj.get("rootfs"), "image config rootfs")
    _texts(rootfs.get("diff_ids"), "image config diff_ids")
    for key in ("os", "architecture", "variant", "created"):
        _text(obj.get(key), f"image config {key}")
    cfg = _object(obj.get("config"), "image config config")
    _text_map(cfg.get("Labels"), "image config Labels")
    _text(cfg.get("StopSignal"), "image config StopSignal")
