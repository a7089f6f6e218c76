"""A pull's mount in the service returns once the zTOC is checked; a thread attaches the view, and
a mount or unmount of the same view meanwhile waits for it (service/layers.py `mount(attach_later=)`,
service/view_locks.py). No FUSE mount here: the service's layer manager over a LayerFS of its own."""

from __future__ import annotations

import gzip
import io
import logging
import threading

import pytest

from helpers.images import Entry, tar_bytes
from lazyoci.config import Config
from lazyoci.errors import FormatError, StoreError
from lazyoci.fs.layer_fs import LayerFS
from lazyoci.oci.digest import sha256_digest
from lazyoci.service.layers import LayerManager
from lazyoci.store.blobs import BlobStore
from lazyoci.store.layout import DataRoot
from lazyoci.ztoc import build_ztoc

REF = "127.0.0.1:9/attach/later:latest"     # nothing listens: no span is read in these tests


@pytest.fixture
def manager(tmp_path):
    root = DataRoot(tmp_path / "root")
    root.ensure()
    m = LayerManager(root, Config(), LayerFS())
    yield m
    m.close()


def _stored_ztoc(manager: LayerManager, truncated: bool = False) -> tuple[str, str]:
    tar = tar_bytes([Entry("etc", "dir"), Entry("etc/hello", data=b"hello\n" * 1000)])
    layer = gzip.compress(tar, mtime=0)
    ztoc = build_ztoc(io.BytesIO(layer), "gzip", span_size=64 << 10)
    if truncated:
        ztoc = ztoc[: len(ztoc) // 2]
    digest = BlobStore(manager.root).put_bytes(ztoc)
    return sha256_digest(layer), digest


def _held_attach(manager: LayerManager, monkeypatch) -> tuple[threading.Event, list[str]]:
    """The manager's attach waits for the returned event; the list names each attach that ran."""
    release, ran = threading.Event(), []
    real = manager._attach

    def attach(view, *args, **kwargs):
        assert release.wait(30)
        ran.append(view[0])
        return real(view, *args, **kwargs)

    monkeypatch.setattr(manager, "_attach", attach)
    return release, ran


def test_a_mount_of_the_view_meanwhile_waits_for_the_attach_and_finds_it_done(manager, monkeypatch):
    layer, ztoc = _stored_ztoc(manager)
    release, ran = _held_attach(manager, monkeypatch)
    manager.mount(REF, layer, ztoc, attach_later=True)      # returns while the attach waits
    assert not manager.fs.has_layer(layer, ztoc)
    second = threading.Thread(target=manager.mount, args=(REF, layer, ztoc), daemon=True)
    second.start()
    second.join(0.2)
    assert second.is_alive() and not manager.fs.has_layer(layer, ztoc)
    release.set()
    second.join(30)
    assert not second.is_alive()
    assert manager.fs.has_layer(layer, ztoc) and ran == [layer]      # attached once, by the pull's mount
    assert [s.layer_digest for s in manager.status()] == [layer]


def test_an_unmount_meanwhile_waits_for_the_attach_then_unmounts(manager, monkeypatch):
    layer, ztoc = _stored_ztoc(manager)
    release, _ = _held_attach(manager, monkeypatch)
    manager.mount(REF, layer, ztoc, attach_later=True)
    unmounted: list[bool] = []
    rollback = threading.Thread(target=lambda: unmounted.append(manager.unmount(layer, ztoc)), daemon=True)
    rollback.start()
    rollback.join(0.2)
    assert rollback.is_alive()
    release.set()
    rollback.join(30)
    assert unmounted == [True] and not manager.fs.has_layer(layer, ztoc)


def test_status_shows_a_view_being_attached_once_it_is(manager, monkeypatch):
    layer, ztoc = _stored_ztoc(manager)
    release, _ = _held_attach(manager, monkeypatch)
    manager.mount(REF, layer, ztoc, attach_later=True)
    threading.Timer(0.2, release.set).start()
    assert [s.layer_digest for s in manager.status()] == [layer]


def test_a_ztoc_that_cannot_be_served_is_refused_before_the_mount_returns(manager):
    layer, ztoc = _stored_ztoc(manager, truncated=True)
    for _ in range(2):         # nothing is left held: the next mount is refused the same way
        with pytest.raises(FormatError):
            manager.mount(REF, layer, ztoc, attach_later=True)
    assert not manager.fs.has_layer(layer, ztoc)


def test_an_attach_that_fails_is_logged_and_the_next_mount_says_why(manager, monkeypatch, caplog):
    layer, ztoc = _stored_ztoc(manager)

    def no_cache(*args, **kwargs):
        raise StoreError("the span cache cannot be written")

    monkeypatch.setattr(manager.cache, "layer", no_cache)
    with caplog.at_level(logging.ERROR, logger="lazyoci.service.layers"):
        manager.mount(REF, layer, ztoc, attach_later=True)
        with pytest.raises(StoreError, match="cannot be written"):
            manager.mount(REF, layer, ztoc)            # waits for the failed attach, then tries itself
    assert any("could not be attached" in r.getMessage() and "cannot be written" in r.getMessage()
               for r in caplog.records)
    assert not manager.fs.has_layer(layer, ztoc)
    monkeypatch.undo()
    manager.mount(REF, layer, ztoc)
    assert manager.fs.has_layer(layer, ztoc)
