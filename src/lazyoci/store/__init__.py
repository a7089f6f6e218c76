"""The local store: the data root's layout, content-addressed blobs and the SQLite database.

The names below are imported on first use, so that a module that needs only the layout does
not load the rest.
"""

from typing import TYPE_CHECKING

from lazyoci.lazy_names import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
