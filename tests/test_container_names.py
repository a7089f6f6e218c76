"""Container names: two containers created at once that drew the same generated name both get
one (docker draws again), and a name the user gave that another container holds is docker's
one-line conflict, whether it was taken before or while the container was being made."""

from __future__ import annotations

import time

import pytest

from lazyoci.errors import ContainerError
from lazyoci.runtime.containers import ContainerRecord, ContainerStore
from lazyoci.store.blobs import BlobStore
from lazyoci.store.db import Database
from lazyoci.store.image_records import ImageRecords
from lazyoci.store.layout import DataRoot

IMAGE = "sha256:" + "ab" * 32


def _store(tmp_path) -> ContainerStore:
    root = DataRoot(tmp_path / "root")
    root.ensure()
    db = Database(root.db_path)
    ImageRecords(db, BlobStore(root))       # the blob_refs table a container's image is held in
    return ContainerStore(root, db)


def _record(cid: str, name: str) -> ContainerRecord:
    return ContainerRecord(id=cid, name=name, image="example/image:latest", image_digest=IMAGE,
                           command=("true",), created=time.time(), status="created", exit_code=None,
                           finished=None, snapshotter="overlayfs", snapshot_key=f"container-{cid}",
                           runtime="runc", auto_remove=False, detached=False, monitor_pid=None)


def test_a_generated_name_taken_meanwhile_is_drawn_again(tmp_path):
    store = _store(tmp_path)
    # Two `run`s draw their names before either records its container: the same name.
    first_id, name = store.new_id_and_name(None)
    second_id, _ = store.new_id_and_name(None)
    first = store.create(_record(first_id, name), name_given=False)
    second = store.create(_record(second_id, name), name_given=False)
    assert first.name == name
    assert second.name != name and second.name
    assert {(r.id, r.name) for r in store.list()} == {(first_id, name), (second_id, second.name)}


def test_a_given_name_that_is_taken_is_one_line_conflict(tmp_path):
    store = _store(tmp_path)
    holder_id, _ = store.new_id_and_name("web")
    store.create(_record(holder_id, "web"), name_given=True)
    with pytest.raises(ContainerError) as before:         # taken before the run began
        store.new_id_and_name("web")
    late_id, _ = store.new_id_and_name("other")
    with pytest.raises(ContainerError) as meanwhile:      # taken while the run was pulling
        store.create(_record(late_id, "web"), name_given=True)
    for e in (before.value, meanwhile.value):
        assert str(e) == (f"the container name 'web' is already in use by container {holder_id[:12]}: "
                          "remove (or rename) that container to reuse the name")
    assert [r.id for r in store.list()] == [holder_id]
