"""The service records only which views it serves; a view's reference is in the lazy-layer records.

Data roots of older versions kept (layer, zTOC, ref) in the service's own tables too
(`service_layers`, then `service_views`): opening one moves those views into
`service_mounted_views` and their references into `lazy_layers`, once.
"""

from __future__ import annotations

from lazyoci.service.view_records import forget_layers, record_view, recorded_views
from lazyoci.store.db import Database
from lazyoci.store.lazy_layer_records import LazyLayerRecord, LazyLayerRecords
from lazyoci.store.layout import DataRoot

LAYER, OTHER, Z1, Z2, INDEX = ("sha256:" + c * 64 for c in "abcde")


def _tables(db: Database) -> set[str]:
    with db.reading() as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()}


def test_an_older_data_roots_service_views_move_to_the_lazy_layer_records(tmp_path):
    db = Database(DataRoot(tmp_path / "root").ensure().db_path)
    LazyLayerRecords(db).record_layer(LazyLayerRecord(LAYER, Z1, "reg/pulled@sha256:" + "1" * 64, INDEX))
    with db.transaction() as c:      # the table as the previous version made it
        c.execute("CREATE TABLE service_views (layer_digest TEXT NOT NULL, ztoc_digest TEXT NOT NULL, "
                  "ref TEXT NOT NULL, mounted_at REAL NOT NULL, PRIMARY KEY (layer_digest, ztoc_digest))")
        c.execute("INSERT INTO service_views VALUES (?, ?, ?, 1.0)", (LAYER, Z1, "reg/served@sha256:" + "2" * 64))
        c.execute("INSERT INTO service_views VALUES (?, ?, ?, 2.0)", (OTHER, Z2, "reg/direct@sha256:" + "3" * 64))

    assert recorded_views(db) == [(LAYER, Z1), (OTHER, Z2)]
    assert "service_views" not in _tables(db)
    records = LazyLayerRecords(db)
    pulled = records.layer(LAYER, Z1)
    assert pulled is not None and pulled.ref.startswith("reg/served@") and pulled.index_digest == INDEX
    direct = records.layer(OTHER, Z2)      # mounted by a direct request: no pull recorded it
    assert direct is not None and direct.ref.startswith("reg/direct@") and direct.index_digest == ""
    assert recorded_views(Database(db.path)) == [(LAYER, Z1), (OTHER, Z2)]     # a second open: nothing to do


def test_the_first_service_table_keyed_by_layer_is_migrated_too(tmp_path):
    db = Database(DataRoot(tmp_path / "root").ensure().db_path)
    with db.transaction() as c:
        c.execute("CREATE TABLE service_layers (layer_digest TEXT PRIMARY KEY, ref TEXT NOT NULL, "
                  "ztoc_digest TEXT NOT NULL, mounted_at REAL NOT NULL)")
        c.execute("INSERT INTO service_layers VALUES (?, ?, ?, 1.0)", (LAYER, "reg/app@sha256:" + "4" * 64, Z1))
    assert recorded_views(db) == [(LAYER, Z1)]
    assert not {"service_layers", "service_views"} & _tables(db)
    rec = LazyLayerRecords(db).layer(LAYER, Z1)
    assert rec is not None and rec.ref == "reg/app@sha256:" + "4" * 64


def test_the_service_table_holds_views_and_nothing_else(tmp_path):
    db = Database(DataRoot(tmp_path / "root").ensure().db_path)
    record_view(db, LAYER, Z1, 1.0)
    record_view(db, LAYER, Z2, 2.0)
    with db.reading() as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(service_mounted_views)").fetchall()]
    assert columns == ["layer_digest", "index_digest", "mounted_at"]
    forget_layers(db, [(LAYER, Z1)])
    assert recorded_views(db) == [(LAYER, Z2)]


def test_a_served_reference_replaces_the_views_recorded_one_only(tmp_path):
    db = Database(DataRoot(tmp_path / "root").ensure().db_path)
    records = LazyLayerRecords(db)
    records.record_layer(LazyLayerRecord(LAYER, Z1, "reg/a@sha256:" + "5" * 64, INDEX))
    records.record_layer(LazyLayerRecord(LAYER, Z2, "reg/b@sha256:" + "6" * 64, INDEX))
    records.record_served_ref(LAYER, Z1, "reg/c@sha256:" + "7" * 64)
    one, two = records.layer(LAYER, Z1), records.layer(LAYER, Z2)
    assert one is not None and one.ref.startswith("reg/c@") and one.index_digest == INDEX
    assert two is not None and two.ref.startswith("reg/b@")


def test_an_older_data_roots_index_formats_move_into_the_lazy_layer_records(tmp_path):
    """Formats were a table of their own (`lazy_index_formats`, a row per view not a zTOC), beside a
    `lazy_layers` without a format column: they become the records' `format`, once."""
    db = Database(DataRoot(tmp_path / "root").ensure().db_path)
    with db.transaction() as c:      # both tables as the previous version made them
        c.execute("CREATE TABLE lazy_layers (layer_digest TEXT NOT NULL, ztoc_digest TEXT NOT NULL, "
                  "ref TEXT NOT NULL, index_digest TEXT NOT NULL, created REAL NOT NULL, "
                  "PRIMARY KEY (layer_digest, ztoc_digest))")
        c.execute("CREATE TABLE lazy_index_formats (layer_digest TEXT NOT NULL, index_digest TEXT NOT NULL, "
                  "format TEXT NOT NULL, PRIMARY KEY (layer_digest, index_digest))")
        c.execute("INSERT INTO lazy_layers VALUES (?, ?, 'reg/a@sha256:1', ?, 1.0)", (LAYER, Z1, INDEX))
        c.execute("INSERT INTO lazy_layers VALUES (?, ?, 'reg/a@sha256:1', '', 1.0)", (OTHER, Z2))
        c.execute("INSERT INTO lazy_index_formats VALUES (?, ?, 'estargz')", (OTHER, Z2))
        c.execute("CREATE TABLE lazy_image_layers (image TEXT NOT NULL, manifest_digest TEXT NOT NULL, "
                  "layer_digest TEXT NOT NULL, ztoc_digest TEXT NOT NULL, created REAL NOT NULL, "
                  "PRIMARY KEY (image, manifest_digest, layer_digest))")
        c.execute("INSERT INTO lazy_image_layers VALUES ('reg/a:latest', 'sha256:1', ?, ?, 1.0)", (LAYER, Z1))
        c.execute("INSERT INTO lazy_image_layers VALUES ('reg/a:latest', 'sha256:1', ?, ?, 1.0)", (OTHER, Z2))
    records = LazyLayerRecords(db)
    zt, own = records.layer(LAYER, Z1), records.layer(OTHER, Z2)
    assert zt is not None and zt.format == "ztoc" and zt.index_digest == INDEX
    assert own is not None and own.format == "estargz"
    assert "lazy_index_formats" not in _tables(db)
    assert records.image_formats("reg/a:latest") == {"ztoc", "estargz"}
    LazyLayerRecords(Database(db.path))       # a second open: nothing to do
    records.record_layer(LazyLayerRecord(LAYER, Z2, "reg/b@sha256:2", "", "zstd:chunked"))
    again = records.layer(LAYER, Z2)
    assert again is not None and again.format == "zstd:chunked"
