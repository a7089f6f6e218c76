"""The config file's parsed document, kept in the data root so that a command need not import PyYAML.

Importing PyYAML cost every command 25 ms on the bench's machines (it compiles its regular
expressions at import), which a lazy start pays twice, for `pull` and for `run`. So the document
PyYAML made of the file is kept as JSON beside the text it came from: a command reads the file,
as it must, and takes the kept document only if that text is the same, byte for byte. The
settings are then checked from it exactly as from a fresh parse (lazyoci/config.py), so a kept
document changes no answer and no error message.

One document is kept per data root (`DataRoot.config_document`), the last one parsed. Nothing
depends on it: a document that is missing, unreadable, of another text or not of the shape
written here is not used, and the file is parsed again; one that cannot be written is not kept.
Values JSON cannot hold as they are (a mapping's non-string keys, the line tables' tuple keys)
are written tagged; a document with a value PyYAML makes that is none of these (a date, bytes, a
set) is not kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lazyoci.errors import StoreError
from lazyoci.store.modes import write_file

__all__ = ["keep_document", "kept_document"]


class _NotKept(Exception):
    """A value the kept form does not hold."""


def kept_document(path: Path, text: str) -> dict | None:
    """The document kept at `path` for exactly this config `text`, else None."""
    try:
        kept = json.loads(path.read_bytes())
        if not isinstance(kept, dict) or kept.get("text") != text:
            return None
        doc = _decode(kept["document"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def keep_document(path: Path, text: str, doc: dict) -> None:
    """Keep `doc`, parsed from `text`, at `path`; quietly not if it cannot be."""
    try:
        data = json.dumps({"text": text, "document": _encode(doc)}).encode()
        write_file(path, data)
    except (_NotKept, StoreError, RecursionError):
        pass


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k), _encode(v)] for k, v in value.items()]}
    raise _NotKept(f"a value of type {type(value).__name__}")


def _decode(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        if isinstance(value.get("tuple"), list):
            return tuple(_decode(v) for v in value["tuple"])
        if isinstance(value.get("dict"), list):
            out = {}
            for pair in value["dict"]:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise ValueError("a mapping's entry is not a pair")
                out[_decode(pair[0])] = _decode(pair[1])      # a list as key: TypeError
            return out
    raise ValueError("not a kept document")
