"""Which format each lazy view's index is in (layer_formats.py), as the lazy pull recorded it.

A view is keyed by (layer digest, index digest). A zTOC needs no row: a view without one
is a zTOC view, as every view of an older lazyoci is. The pull writes the row before it
asks the service to mount, and the service reads it at every mount (also after a
restart), so an index is only ever opened as the format its own layer was recognised in:
a SOCI index cannot have its zTOC read as another format.
"""

from __future__ import annotations

from lazyoci.store.db import Database

__all__ = ["format_of", "formats_of", "formats_of_image", "record_format"]

_SCHEMA_NAME = "lazy_index_formats"
_DDL = """
CREATE TABLE IF NOT EXISTS lazy_index_formats (
    layer_digest TEXT NOT NULL,
    index_digest TEXT NOT NULL,      -- the index blob the view is keyed by (a zTOC, an eStargz TOC)
    format       TEXT NOT NULL,      -- a name of layer_formats.FORMATS
    PRIMARY KEY (layer_digest, index_digest)
)"""
DEFAULT = "ztoc"


def record_format(db: Database, layer_digest: str, index_digest: str, format: str) -> None:
    db.ensure_schema(_SCHEMA_NAME, _DDL)
    with db.transaction() as conn:
        conn.execute("INSERT OR REPLACE INTO lazy_index_formats VALUES (?, ?, ?)",
                     (layer_digest, index_digest, format))


def format_of(db: Database, layer_digest: str, index_digest: str) -> str:
    db.ensure_schema(_SCHEMA_NAME, _DDL)
    with db.reading() as conn:
        row = conn.execute("SELECT format FROM lazy_index_formats WHERE layer_digest=? AND index_digest=?",
                           (layer_digest, index_digest)).fetchone()
    return row[0] if row else DEFAULT


def formats_of(db: Database) -> dict[tuple[str, str], str]:
    """Every recorded (layer, index) view that is not a zTOC, with its format."""
    db.ensure_schema(_SCHEMA_NAME, _DDL)
    with db.reading() as conn:
        return {(r[0], r[1]): r[2] for r in conn.execute(
            "SELECT layer_digest, index_digest, format FROM lazy_index_formats").fetchall()}


def formats_of_image(db: Database, image: str) -> set[str]:
    """The formats of the lazy layers the latest lazy pull of `image` (a name) recorded."""
    import sqlite3

    db.ensure_schema(_SCHEMA_NAME, _DDL)
    try:
        with db.reading() as conn:
            rows = conn.execute(
                "SELECT DISTINCT coalesce(f.format, ?) FROM lazy_image_layers l LEFT JOIN lazy_index_formats f "
                "ON f.layer_digest = l.layer_digest AND f.index_digest = l.ztoc_digest WHERE l.image = ?",
                (DEFAULT, image)).fetchall()
    except sqlite3.OperationalError:     # no lazy pull ever ran in this data root
        return set()
    return {r[0] for r in rows}
