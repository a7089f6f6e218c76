"""The indexes layers carry themselves (eStargz, zstd:chunked TOCs) are held by their layer
until no remaining image's lazy records use a view of it; then the soci snapshotter's release
lets them go and the next garbage collection deletes them. (With real images:
tests/test_lazy_zstdchunked.py.)"""

from __future__ import annotations

import hashlib

from helpers.lazy import write_config
from lazyoci.config import load_config
from lazyoci.snapshot.own_index import OWNER_KINDS
from lazyoci.snapshot.soci import SociSnapshotter
from lazyoci.store.image_records import ImageRecords
from lazyoci.store.layout import DataRoot


def test_an_index_no_image_needs_is_released(tmp_path):
    root = DataRoot(tmp_path / "root").ensure()
    snap = SociSnapshotter(root, load_config(write_config(tmp_path / "c.yaml")))
    records = ImageRecords(snap.db, snap.blobs)
    stored = []
    for kind in OWNER_KINDS:
        data = f"the {kind} index".encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        snap.blobs.put_bytes(data, digest)
        records.add_owner(f"{kind}:sha256:" + "a" * 64, [digest])
        stored.append(digest)
    records.gc()
    assert all(snap.blobs.has(d) for d in stored)          # held by their layer

    snap.release_unused(set())                             # no image left
    assert [records.owners_of_kind(kind) for kind in OWNER_KINDS] == [[], []]
    records.gc()
    assert not any(snap.blobs.has(d) for d in stored)
