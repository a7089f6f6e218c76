"""`images --filter`: docker's image filters over the rows of `images`.

Filters of one key are alternatives, filters of different keys must all hold (docker's rule):
`dangling=true|false`, `label=KEY` or `label=KEY=VALUE`, `before=IMAGE`, `since=IMAGE` (by the
image config's creation time) and `reference=PATTERN` (a glob on REPOSITORY or REPOSITORY:TAG
whose `*` does not cross a `/`).
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazyoci.errors import ConfigError, LazyociError
from lazyoci.filter_syntax import split_filter
from lazyoci.oci.manifest import ImageConfig, Manifest

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService, ImageSummary

FILTER_KEYS = ("before", "dangling", "label", "reference", "since")


@dataclass(frozen=True)
class ImageFilter:
    key: str
    value: str

    @classmethod
    def parse(cls, text: str) -> "ImageFilter":
        key, value = split_filter(text, FILTER_KEYS)
        if key == "dangling" and value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"invalid filter 'dangling={value}': true or false")
        if not value and key != "label":
            raise ConfigError(f"filter {key!r} needs a value")
        if key == "label" and not value.partition("=")[0]:
            raise ConfigError("filter 'label' needs KEY or KEY=VALUE")
        return cls(key, value)


def _when(text: str | None) -> _dt.datetime | None:
    if not text:
        return None
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)


def _glob(pattern: str) -> re.Pattern[str]:
    parts = [re.escape(c) if c not in "*?" else ("[^/]*" if c == "*" else "[^/]") for c in pattern]
    return re.compile("".join(parts) + r"\Z")


class _Matcher:
    def __init__(self, svc: ImageService, filters: list[ImageFilter]) -> None:
        self.svc = svc
        self.by_key: dict[str, list[str]] = {}
        for f in filters:
            self.by_key.setdefault(f.key, []).append(f.value)
        self.bounds = {key: [self._created_of(v) for v in values]
                       for key, values in self.by_key.items() if key in ("before", "since")}
        self._labels: dict[str, dict[str, str]] = {}

    def _created_of(self, ref: str) -> _dt.datetime:
        when = _when(self.svc.get(ref).config.created)      # no such image: its one error
        if when is None:
            raise ConfigError(f"image {ref} has no creation time to compare with")
        return when

    def _labels_of(self, row: ImageSummary) -> dict[str, str]:
        if row.manifest not in self._labels:
            try:
                manifest = Manifest.parse(self.svc.blobs.read(row.manifest))
                self._labels[row.manifest] = ImageConfig.parse(self.svc.blobs.read(manifest.config.digest)).labels
            except LazyociError:
                self._labels[row.manifest] = {}
        return self._labels[row.manifest]

    def _one(self, key: str, value: str, row: ImageSummary, bound: _dt.datetime | None) -> bool:
        if key == "dangling":
            return (row.name is None) == (value.lower() in ("true", "1"))
        if key == "label":
            name, sep, wanted = value.partition("=")
            labels = self._labels_of(row)
            return name in labels and (not sep or labels[name] == wanted)
        if key == "reference":
            if row.name is None:
                return False
            pattern = _glob(value)
            return any(pattern.match(c) for c in (row.repository, f"{row.repository}:{row.tag}", row.name))
        created = _when(row.created)
        if created is None or bound is None:
            return False
        return created < bound if key == "before" else created > bound

    def __call__(self, row: ImageSummary) -> bool:
        for key, values in self.by_key.items():
            bounds: Sequence[_dt.datetime | None] = self.bounds.get(key) or [None] * len(values)
            if not any(self._one(key, v, row, b) for v, b in zip(values, bounds)):
                return False
        return True


def filter_images(svc: ImageService, rows: Iterable[ImageSummary], filters: Iterable[str]) -> list[ImageSummary]:
    """The rows that pass every filter (each given as docker writes it: KEY=VALUE)."""
    parsed = [ImageFilter.parse(f) for f in filters]
    rows = list(rows)
    if not parsed:
        return rows
    keep = _Matcher(svc, parsed)
    return [r for r in rows if keep(r)]
