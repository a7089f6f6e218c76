"""The local store: the data root's layout, content-addressed blobs and the SQLite database.

The names below are imported on first use, so that a module that needs only the layout does
not load the rest.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # what the names are, for type checkers; at run time __getattr__ imports them
    from lazyoci.store.blobs import BlobStore, BlobWriter
    from lazyoci.store.db import Database
    from lazyoci.store.layout import DataRoot

_WHERE = {
    "DataRoot": "layout", "BlobStore": "blobs", "BlobWriter": "blobs", "Database": "db",
}

__all__ = [
    "BlobStore", "BlobWriter", "DataRoot", "Database",
]


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
