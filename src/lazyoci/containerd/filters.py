"""containerd's filter syntax, as its snapshot List sends it: `labels."K"==V,parent==P`.

A filter is selectors joined by commas (all must hold); a selector is a field path
(`name`, `parent`, `kind`, `labels.K`, a component quoted as "..." when it holds dots)
alone (the field is present) or followed by `==`, `!=` or `~=` (a regular expression)
and a value, bare or quoted. A filter that does not parse is a FormatError (the gRPC
edge answers InvalidArgument).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lazyoci.errors import FormatError
from lazyoci.snapshot.base import SnapshotInfo

__all__ = ["SnapshotFilter"]

_OPS = ("==", "!=", "~=")
_MAX_FILTER = 8192


def _quoted(text: str, i: int) -> tuple[str, int]:
    """The Go-quoted string starting at text[i] == '"', and the index after it."""
    out = []
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\" and j + 1 < len(text):
            out.append({"n": "\n", "t": "\t", '"': '"', "\\": "\\"}.get(text[j + 1], text[j + 1]))
            j += 2
            continue
        if c == '"':
            return "".join(out), j + 1
        out.append(c)
        j += 1
    raise FormatError(f"filter {text!r}: unterminated quote")


@dataclass(frozen=True)
class _Selector:
    path: tuple[str, ...]
    op: str | None
    value: str

    def field(self, info: SnapshotInfo) -> str | None:
        if self.path == ("name",):
            return info.key
        if self.path == ("parent",):
            return info.parent or ""
        if self.path == ("kind",):
            return info.kind
        if len(self.path) == 2 and self.path[0] == "labels":
            return info.labels.get(self.path[1])
        return None

    def matches(self, info: SnapshotInfo) -> bool:
        got = self.field(info)
        if self.op is None:
            return got is not None
        if self.op == "==":
            return got == self.value
        if self.op == "!=":
            return got != self.value
        return got is not None and re.search(self.value, got) is not None


@dataclass(frozen=True)
class SnapshotFilter:
    selectors: tuple[_Selector, ...]

    @classmethod
    def parse(cls, text: str) -> "SnapshotFilter":
        if len(text) > _MAX_FILTER:
            raise FormatError(f"filter of {len(text)} bytes is too long")
        selectors = []
        i = 0
        while i < len(text):
            path: list[str] = []
            while True:               # field path: components separated by dots
                if i < len(text) and text[i] == '"':
                    part, i = _quoted(text, i)
                else:
                    m = re.compile(r"[A-Za-z0-9_\-/]+").match(text, i)
                    if m is None:
                        raise FormatError(f"filter {text!r}: expected a field name at offset {i}")
                    part, i = m.group(0), m.end()
                path.append(part)
                if i < len(text) and text[i] == ".":
                    i += 1
                    continue
                break
            op, value = None, ""
            if text.startswith(_OPS, i):
                op = text[i:i + 2]
                i += 2
                if i < len(text) and text[i] == '"':
                    value, i = _quoted(text, i)
                else:
                    end = text.find(",", i)
                    end = len(text) if end < 0 else end
                    value, i = text[i:end], end
                if op == "~=":
                    try:
                        re.compile(value)
                    except re.error as e:
                        raise FormatError(f"filter {text!r}: bad regular expression: {e}") from None
            selectors.append(_Selector(tuple(path), op, value))
            if i < len(text):
                if text[i] != ",":
                    raise FormatError(f"filter {text!r}: unexpected {text[i]!r} at offset {i}")
                i += 1
        if not selectors:
            raise FormatError("empty filter")
        return cls(tuple(selectors))

    def matches(self, info: SnapshotInfo) -> bool:
        return all(s.matches(info) for s in self.selectors)
