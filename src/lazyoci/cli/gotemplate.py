"""The part of docker's `--format` Go templates that listings need.

Supported: literal text, `{{.Field}}` (also `{{.State.Status}}` in nested objects),
`{{json .Field}}`, `{{json .}}`, the escapes
`\\t` and `\\n` as docker unescapes them, and a leading `table ` (a header row of the
fields' titles, columns aligned at tabs). Anything else in `{{ }}` is one error
rather than output that silently differs from docker's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lazyoci.errors import ConfigError

_ACTION = re.compile(r"{{\s*(.*?)\s*}}")
_FIELD = re.compile(r"(json\s+)?\.([A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z][A-Za-z0-9]*)*)?$")


@dataclass(frozen=True)
class Template:
    """A parsed `--format` value: literal text and field actions, in order."""

    parts: tuple[tuple[str, str], ...]    # ("text", s) | ("field", name) | ("json", name or "")
    table: bool

    @classmethod
    def parse(cls, text: str, fields: Sequence[str] | None = None) -> "Template":
        """Parse `text`; with `fields`, a name outside them is an error now rather than at render."""
        table = text.startswith("table")
        if table:
            text = text[len("table"):].lstrip(" ")
        text = text.replace("\\t", "\t").replace("\\n", "\n")
        parts: list[tuple[str, str]] = []
        at = 0
        for m in _ACTION.finditer(text):
            if m.start() > at:
                parts.append(("text", text[at:m.start()]))
            action = _FIELD.match(m.group(1))
            if action is None:
                raise ConfigError(f"unsupported --format action {m.group(0)!r}: use {{{{.Field}}}}, "
                                  f"{{{{json .Field}}}} or {{{{json .}}}}")
            name = action.group(2) or ""
            if name and fields is not None and name.split(".")[0] not in fields:
                raise ConfigError(f"--format: no field {name!r} (fields: {', '.join(fields)})")
            if not name and not action.group(1):
                raise ConfigError("--format: {{.}} needs json: {{json .}}")
            parts.append(("json" if action.group(1) else "field", name))
            at = m.end()
        if at < len(text):
            parts.append(("text", text[at:]))
        if "{{" in "".join(p for kind, p in parts if kind == "text"):
            raise ConfigError(f"--format: unclosed action in {text!r}")
        return cls(tuple(parts), table)

    def render(self, row: Mapping[str, object]) -> str:
        out = []
        for kind, value in self.parts:
            if kind == "text":
                out.append(value)
            elif kind == "field":
                out.append(_text(_lookup(row, value)))
            else:
                whole = dict(sorted(row.items())) if not value else _lookup(row, value)
                out.append(json.dumps(whole, ensure_ascii=False))
        return "".join(out)

    def header(self, titles: Mapping[str, str]) -> str:
        """The row of titles a `table` template starts with."""
        names = {value for kind, value in self.parts if kind != "text" and value}
        return self.render({name: titles.get(name, name.upper()) for name in names})


def _lookup(row: Mapping[str, object], path: str) -> object:
    if path in row:
        return row[path]
    value: object = row
    for name in path.split("."):
        if not isinstance(value, Mapping) or name not in value:
            raise ConfigError(f"--format: no field {path!r}")
        value = value[name]
    return value


def _text(value: object) -> str:
    """A value as Go's templates print scalars; lists and objects as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "<no value>"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def format_rows(template: Template, rows: Sequence[Mapping[str, object]], titles: Mapping[str, str]) -> list[str]:
    """Every row rendered; for a `table` template, the header first and tab-separated columns aligned."""
    lines = [template.render(r) for r in rows]
    if not template.table:
        return lines
    lines.insert(0, template.header(titles))
    cells = [line.split("\t") for line in lines]
    columns = max(len(c) for c in cells)
    widths = [max((len(c[i]) for c in cells if len(c) > i + 1), default=0) for i in range(columns)]
    return ["   ".join(cell.ljust(widths[i]) if i + 1 < len(c) else cell for i, cell in enumerate(c)).rstrip()
            for c in cells]
