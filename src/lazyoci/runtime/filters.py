"""`ps --filter KEY=VALUE`: which containers a listing keeps, by docker's rules.

Values of one key are alternatives, different keys must all match. A `status`
filter looks at every container (as `-a`). Keys: id (prefix), name (a regular
expression searched in the name, as docker does), status, exited (exit code),
ancestor (image name, ID or ID prefix), before and since (a container: created
before or after it), snapshotter, label (KEY or KEY=VALUE of its `--label`s).
An unknown key or a bad value is one error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lazyoci.errors import ConfigError, ReferenceError_
from lazyoci.filter_syntax import split_filter
from lazyoci.oci.reference import Reference
from lazyoci.runtime.containers import ContainerRecord

STATES = ("created", "restarting", "running", "removing", "paused", "exited", "dead")
KEYS = ("id", "name", "status", "exited", "ancestor", "before", "since", "snapshotter", "label")


@dataclass(frozen=True)
class ContainerFilter:
    """Parsed `--filter` values, key by key."""

    values: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def parse(cls, items: Sequence[str]) -> "ContainerFilter":
        by_key: dict[str, list[str]] = {}
        for item in items:
            key, value = split_filter(item, KEYS)
            if key == "status" and value not in STATES:
                raise ConfigError(f"invalid filter 'status={value}' (states: {', '.join(STATES)})")
            if key == "exited" and not (value.lstrip("-").isascii() and value.lstrip("-").isdigit()):
                raise ConfigError(f"invalid filter 'exited={value}': not an exit code")
            if key == "name":
                try:
                    re.compile(value)
                except re.error as e:
                    raise ConfigError(f"invalid filter 'name={value}': {e}") from None
            by_key.setdefault(key, []).append(value)
        return cls(tuple((k, tuple(v)) for k, v in by_key.items()))

    @property
    def wants_all(self) -> bool:
        """A status filter lists stopped containers too, as `-a` does."""
        return any(key == "status" for key, _ in self.values)

    def apply(self, records: Sequence[ContainerRecord],
              labels: Callable[[str], dict[str, str]] = lambda _id: {}) -> list[ContainerRecord]:
        """The records that match every key (newest first, as given); `labels` gives a
        container's labels by its ID (read only when a label filter asks)."""
        created = {key: self._reference_time(key, vals, records) for key, vals in self.values
                   if key in ("before", "since")}
        return [r for r in records
                if all(self._matches(r, key, vals, created, labels) for key, vals in self.values)]

    @staticmethod
    def _reference_time(key: str, values: tuple[str, ...], records: Sequence[ContainerRecord]) -> float:
        value = values[-1]
        for r in records:
            if value in (r.name, r.id) or (len(value) >= 3 and r.id.startswith(value)):
                return r.created
        raise ConfigError(f"invalid filter '{key}={value}': no such container")

    @staticmethod
    def _matches(r: ContainerRecord, key: str, values: tuple[str, ...], created: dict[str, float],
                 labels: Callable[[str], dict[str, str]]) -> bool:
        if key == "label":     # docker: every label filter must hold (not alternatives)
            have = labels(r.id)
            return all(v.partition("=")[0] in have and (not v.partition("=")[1] or
                                                         have[v.partition("=")[0]] == v.partition("=")[2])
                       for v in values)
        if key == "id":
            return any(r.id.startswith(v) for v in values)
        if key == "name":
            return any(re.search(v, r.name) for v in values)
        if key == "status":
            return r.status in values
        if key == "exited":
            return r.status == "exited" and r.exit_code is not None and str(r.exit_code) in values
        if key == "ancestor":
            return any(_is_image(r, v) for v in values)
        if key == "before":
            return r.created < created[key]
        if key == "since":
            return r.created > created[key]
        return r.snapshotter in values


def _is_image(r: ContainerRecord, value: str) -> bool:
    """The container's image by the name it was run with (normalised as docker does), or by ID."""
    hex_id = r.image_digest.removeprefix("sha256:")
    if value in (r.image, r.image_digest) or (len(value) >= 3 and hex_id.startswith(value)):
        return True
    try:
        return str(Reference.parse(value)) == r.image
    except ReferenceError_:
        return False
