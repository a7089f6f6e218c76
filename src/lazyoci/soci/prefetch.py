"""Prefetch artifacts: which spans of a lazy layer to fetch at mount, in the reference's format.

A prefetch artifact is a small JSON blob in a SOCI index, beside the zTOCs, with media type
`application/vnd.amazon.soci.prefetch.v1+json` and the annotation
`com.amazon.soci.image-layer-digest` naming its layer; its span numbers are those of the zTOC
the same index gives that layer. The JSON is the reference's `PrefetchArtifact` (version
"1.0", `prefetch_spans` of inclusive `start_span`/`end_span` ranges, optional `priority`),
written byte for byte as Go's encoding/json writes it, so either tool reads the other's.
Ranges are sorted and merged as the reference normalises them (adjacent ranges join).

`artifacts_for_files` finds each path in the topmost layer that has it (as `soci create
--prefetch-file` does) and covers the spans of its data and of the tar headers lazyoci checks
before serving it (its own and its parent directories'); `artifact_for_spans` writes the
spans a recorded run read (`lazyoci soci optimize`) in the order it read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from lazyoci.errors import FormatError, ConfigError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.digest import sha256_digest
from lazyoci.oci.manifest import Descriptor
from lazyoci.oci.whiteout import normalise
from lazyoci.soci.index import ANN_LAYER_DIGEST, go_json

if TYPE_CHECKING:
    from lazyoci.fs.layer_index import LayerIndex
    from lazyoci.soci.index_records import SociRecords
    from lazyoci.store.blobs import BlobStore

VERSION = "1.0"
MAX_ARTIFACT_BYTES = 4 << 20        # a range is ~40 bytes: far more ranges than any zTOC has spans


@dataclass(frozen=True)
class PrefetchSpan:
    """Spans start_span..end_span (both included) of one layer's zTOC."""

    start_span: int
    end_span: int
    priority: int = 0               # lower first; 0 is left out of the JSON, as Go's omitempty does

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"start_span": self.start_span, "end_span": self.end_span}
        if self.priority:
            out["priority"] = self.priority
        return out


@dataclass(frozen=True)
class PrefetchArtifact:
    version: str
    prefetch_spans: tuple[PrefetchSpan, ...]

    def to_bytes(self) -> bytes:
        """The reference's encoding: compact JSON, fields in its struct order."""
        return go_json({"version": self.version,
                        "prefetch_spans": [s.to_json() for s in self.prefetch_spans]})

    def spans(self) -> list[int]:
        """Every span the artifact names, in its order (lower priority first), each once."""
        seen: set[int] = set()
        out = []
        for r in sorted(self.prefetch_spans, key=lambda s: s.priority):
            for i in range(r.start_span, r.end_span + 1):
                if i not in seen:
                    seen.add(i)
                    out.append(i)
        return out

    def check_spans(self, num_spans: int, what: str) -> None:
        """FormatError if a range names a span the layer's zTOC does not have."""
        for r in self.prefetch_spans:
            if r.end_span >= num_spans:
                raise FormatError(f"{what} names span {r.end_span}, but the layer's zTOC has {num_spans} spans")

    @classmethod
    def parse(cls, raw: bytes, what: str = "prefetch artifact") -> "PrefetchArtifact":
        """Read an artifact written by lazyoci or the reference; FormatError if it is not one."""
        if len(raw) > MAX_ARTIFACT_BYTES:
            raise FormatError(f"{what} is {len(raw)} bytes, over lazyoci's limit of {MAX_ARTIFACT_BYTES}")
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"{what} is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise FormatError(f"{what} is not a JSON object")
        if obj.get("version") != VERSION:
            raise FormatError(f"{what} has version {obj.get('version')!r}; lazyoci reads {VERSION!r}")
        ranges = obj.get("prefetch_spans")
        if not isinstance(ranges, list) or not ranges:
            raise FormatError(f"{what} is empty (no prefetch_spans)")
        out = []
        for r in ranges:
            if not isinstance(r, dict):
                raise FormatError(f"{what}: a prefetch span is not an object: {r!r}")
            start, end, prio = r.get("start_span"), r.get("end_span"), r.get("priority", 0)
            if not (type(start) is int and type(end) is int and type(prio) is int) \
                    or not 0 <= start <= end < 1 << 32:
                raise FormatError(f"{what}: invalid prefetch span {r!r}")
            out.append(PrefetchSpan(start, end, prio))
        return cls(str(obj["version"]), tuple(out))


def normalise_spans(spans: Iterable[PrefetchSpan]) -> tuple[PrefetchSpan, ...]:
    """Sorted, with overlapping and adjacent ranges merged (the reference's rule)."""
    merged: list[PrefetchSpan] = []
    for s in sorted(spans, key=lambda s: (s.start_span, s.end_span)):
        if merged and s.start_span <= merged[-1].end_span + 1:
            last = merged[-1]
            merged[-1] = PrefetchSpan(last.start_span, max(last.end_span, s.end_span))
        else:
            merged.append(PrefetchSpan(s.start_span, s.end_span))
    return tuple(merged)


def artifact_descriptor(artifact: PrefetchArtifact, layer_digest: str) -> tuple[Descriptor, bytes]:
    """The index entry of an artifact for `layer_digest`, and the blob it names."""
    raw = artifact.to_bytes()
    return Descriptor(mt.SOCI_PREFETCH, sha256_digest(raw), len(raw),
                      annotations={ANN_LAYER_DIGEST: layer_digest}), raw


def file_spans(index: "LayerIndex", path: str) -> list[PrefetchSpan]:
    """The spans holding the data and tar header of `path` in a layer, and the headers of its
    parent directories there (lazyoci checks those before it serves the file); [] if the layer
    lacks the path."""
    want = normalise(path)
    if not want:
        raise ConfigError(f"prefetch file {path!r} is not a path inside the image")
    parents = {"/".join(want.split("/")[:n]) for n in range(1, want.count("/") + 1)}
    found: list[PrefetchSpan] = []
    headers: list[PrefetchSpan] = []
    for i in range(len(index)):
        e = index.entry(i)
        name = normalise(e.name)
        if name == want:
            spans = index.spans_for(max(e.offset - 512, 0), max(e.offset + e.size, e.offset + 1))
            found = [PrefetchSpan(spans[0], spans[-1])] if spans else []
        elif name in parents:
            spans = index.spans_for(max(e.offset - 512, 0), e.offset + 1)
            if spans:
                headers.append(PrefetchSpan(spans[0], spans[-1]))
    return found + headers if found else []


def artifacts_for_files(layers: Sequence[tuple[str, "LayerIndex"]], paths: Iterable[str],
                        warn: Any = lambda line: None) -> dict[str, PrefetchArtifact]:
    """Layer digest -> artifact covering `paths`; `layers` in image order, (digest, zTOC) each.

    Each path is taken from the topmost layer that has it; a path no layer has is named to `warn`."""
    found: dict[str, list[PrefetchSpan]] = {}
    for path in paths:
        for digest, index in reversed(layers):
            spans = file_spans(index, path)
            if spans:
                found.setdefault(digest, []).extend(spans)
                break
        else:
            warn(f"prefetch file {path} not found in any layer")
    return {d: PrefetchArtifact(VERSION, normalise_spans(rs)) for d, rs in found.items()}


def artifact_for_spans(spans: Sequence[int]) -> PrefetchArtifact:
    """An artifact of spans in the order a run read them: each run of consecutive spans one
    range, and the priority its place in the order (0 first)."""
    if not spans:
        raise ConfigError("no spans to prefetch: the run read nothing of this layer")
    ranges: list[PrefetchSpan] = []
    seen: set[int] = set()
    for i in spans:
        if i in seen:
            continue
        seen.add(i)
        if ranges and ranges[-1].end_span == i - 1:
            ranges[-1] = PrefetchSpan(ranges[-1].start_span, i, ranges[-1].priority)
        else:
            ranges.append(PrefetchSpan(i, i, len(ranges)))
    return PrefetchArtifact(VERSION, tuple(ranges))


def load_prefetch_files(files: Iterable[str], json_file: Path | None) -> tuple[str, ...]:
    """`--prefetch-file` values and the JSON array of paths of `--prefetch-files-json`, trimmed,
    empty ones dropped (as the reference does)."""
    out = [f.strip() for f in files if f.strip()]
    if json_file is not None:
        try:
            obj = json.loads(json_file.read_bytes())
        except OSError as e:
            raise ConfigError(f"cannot read --prefetch-files-json {json_file}: {e.strerror}") from None
        except ValueError as e:
            raise ConfigError(f"--prefetch-files-json {json_file} is not JSON: {e}") from None
        if not isinstance(obj, list) or not all(isinstance(p, str) for p in obj):
            raise ConfigError(f"--prefetch-files-json {json_file} must hold a JSON array of strings")
        out += [p.strip() for p in obj if p.strip()]
    return tuple(out)


@dataclass(frozen=True)
class StoredArtifact:
    """A prefetch artifact named by a SOCI index stored locally (`soci prefetch ls`)."""

    digest: str
    layer_digest: str
    size: int
    index_digest: str
    created_at: float                  # when its index was stored


def stored_artifacts(blobs: "BlobStore", records: "SociRecords") -> list[StoredArtifact]:
    """Every prefetch artifact of the locally stored indexes, once each (the newest index's)."""
    from lazyoci.soci.index import SociIndex
    seen: dict[str, StoredArtifact] = {}
    for rec in sorted(records.indexes(), key=lambda r: r.created_at):
        if not blobs.has(rec.index_digest):
            continue
        for d in SociIndex.parse(blobs.read(rec.index_digest)).prefetch:
            seen[d.digest] = StoredArtifact(d.digest, d.annotations.get(ANN_LAYER_DIGEST, ""), d.size,
                                            rec.index_digest, rec.created_at)
    return list(seen.values())


def present_artifacts(blobs: "BlobStore", records: "SociRecords") -> list[tuple[StoredArtifact, PrefetchArtifact]]:
    """The stored artifacts whose blob is in the store, each read (`soci prefetch ls`)."""
    return [(a, PrefetchArtifact.parse(blobs.read(a.digest), f"prefetch artifact {a.digest}"))
            for a in stored_artifacts(blobs, records) if blobs.has(a.digest)]


def stored_artifact(blobs: "BlobStore", records: "SociRecords", digest: str) -> tuple[StoredArtifact, PrefetchArtifact]:
    """One stored artifact and its contents (`soci prefetch info`); StoreError when no stored
    index names it or its blob is gone."""
    from lazyoci.errors import StoreError
    known = {a.digest: a for a in stored_artifacts(blobs, records)}
    if digest not in known or not blobs.has(digest):
        raise StoreError(f"no prefetch artifact {digest} in the SOCI indexes stored locally")
    return known[digest], PrefetchArtifact.parse(blobs.read(digest), f"prefetch artifact {digest}")
