"""Complete lazy layers unpacked from the span cache, through the real service, registry and
kernel: new snapshots stack the unpacked directories, which hold what umoci unpacks; a cached
tar that does not hash to the image's diff ID is never kept; the files are on disk before a
snapshot points at them; the directories go with the snapshots."""

from __future__ import annotations

import gzip
import os
import subprocess
import time
from pathlib import Path

import pytest

from helpers.lazy import push_soci_index, write_config
from helpers.tree import diff_trees, walk_tree
from helpers.tricky_image import push_tricky_image
from lazyoci.config import load_config
from lazyoci.errors import IntegrityError, LazyociError, StoreError
from lazyoci.images.service import ImageService
from lazyoci.service.client import ServiceClient
from lazyoci import libc
from lazyoci.snapshot.cached_unpack import unpack_cached_layer
from lazyoci.snapshot.soci import SociSnapshotter
from lazyoci.store.layout import DataRoot

pytestmark = pytest.mark.needs_root("FUSE and overlay mounts")


def _lowers(snap: SociSnapshotter, key: str) -> list[str]:
    [mount] = snap.mounts(key)
    [lowerdir] = [o for o in mount.options if o.startswith("lowerdir=")]
    return lowerdir.removeprefix("lowerdir=").split(":")


def _pull(registry, tmp_path: Path, data_root: Path, repo: str, config: Path):
    tricky = push_tricky_image(registry.host, repo, tmp_path)
    push_soci_index(registry.host, repo, tmp_path)
    root = DataRoot(data_root)
    images = ImageService(root)
    snap = SociSnapshotter(root, load_config(config), client=images.client)
    image = snap.pull(images, f"{registry.host}/{repo}:latest")
    return tricky, images, snap, image


def test_complete_layers_are_unpacked_and_new_snapshots_stack_them(registry, data_root, tmp_path):
    config = write_config(tmp_path / "c.yaml", background=True, quiet=0.2, interval_ms=5)
    tricky, images, snap, image = _pull(registry, tmp_path, data_root, "unpack/complete", config)
    client = ServiceClient(DataRoot(data_root), config)
    try:
        deadline = time.monotonic() + 60
        while {l["unpack"] for l in client.status()["layers"]} != {"unpacked"}:
            assert time.monotonic() < deadline, client.status()["layers"]
            time.sleep(0.1)
        assert len(client.status()["layers"]) == 3
        top = snap.unpack_image(None, image)
        assert top is not None
        lowers = _lowers(snap, top)
        mnt = str(client.paths.mountpoint)
        assert len(lowers) == 3 and not any(l.startswith(mnt) for l in lowers), lowers
        assert snap.is_lazy(top)        # pulled lazily all the same

        bundle = tmp_path / "umoci-bundle"
        subprocess.run(["umoci", "unpack", "--image", f"{tricky.layout}:latest", str(bundle)],
                       check=True, capture_output=True)
        snap.view("check", top)
        merged = tmp_path / "merged"
        merged.mkdir()
        [mount] = snap.mounts("check")
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(mount.options), str(merged)],
                       check=True, capture_output=True)
        try:
            problems = diff_trees(walk_tree(bundle / "rootfs", mtimes=True), walk_tree(merged, mtimes=True))
        finally:
            subprocess.run(["umount", str(merged)], check=True)
        assert not problems, "\n".join(problems)
        snap.remove("check")

        # a new service finds the layers complete and their snapshots with their directories
        client.stop()
        client.start()
        deadline = time.monotonic() + 30
        while [l["unpack"] for l in client.status()["layers"]] != ["unpacked"] * 3:
            assert time.monotonic() < deadline, client.status()["layers"]
            time.sleep(0.1)
        assert _lowers(snap, top) == lowers

        # the unpacked directories go with the last snapshot that stands on them
        dirs = [Path(l).parent for l in lowers]
        assert len(snap.release_unused(set())) == 3
        assert not any(d.exists() for d in dirs)
        assert not any(snap.unpacked_dir(l.diff_id) for l in tricky.layers)
    finally:
        images.close()
        client.stop()


def test_a_cached_tar_that_is_not_the_layer_is_never_kept(registry, data_root, tmp_path, monkeypatch):
    # no background fetch, and no unpack by the service: a layer of one span is complete once its
    # mount fetches its first span, and the service's own unpack of it would race this test's
    config = write_config(tmp_path / "c.yaml", extra="  unpack_complete_layers: false\n")
    tricky, images, snap, image = _pull(registry, tmp_path, data_root, "unpack/wrong", config)
    client = ServiceClient(DataRoot(data_root), config)
    try:
        top = snap.unpack_image(None, image)
        assert top is not None
        layer = tricky.layers[0]
        raw = gzip.decompress(layer.blob)
        bad = bytearray(raw)
        bad[len(bad) // 2] ^= 1
        wrong = tmp_path / "wrong.tar"
        wrong.write_bytes(bytes(bad))
        with pytest.raises(IntegrityError):
            unpack_cached_layer(snap, layer.digest, wrong, len(bad))
        assert snap.unpacked_dir(layer.diff_id) is None
        assert not any((snap.dir / "tmp").iterdir())          # its staging directory is gone
        short = tmp_path / "short.tar"                        # a cache file that ends early
        short.write_bytes(raw[:len(raw) // 2])
        with pytest.raises(LazyociError):
            unpack_cached_layer(snap, layer.digest, short, len(raw))
        assert snap.unpacked_dir(layer.diff_id) is None and not any((snap.dir / "tmp").iterdir())
        mnt = str(client.paths.mountpoint)
        assert all(l.startswith(mnt) for l in _lowers(snap, top))

        right = tmp_path / "right.tar"
        right.write_bytes(raw)
        free = os.statvfs(snap.dir).f_bavail * os.statvfs(snap.dir).f_frsize
        with pytest.raises(StoreError, match="not unpacked"):      # it would take the last of the disk
            unpack_cached_layer(snap, layer.digest, right, len(raw), min_free=free)
        assert snap.unpacked_dir(layer.diff_id) is None and not any((snap.dir / "tmp").iterdir())

        # the files reach the disk before anything points at them; a flush that fails keeps nothing
        real_syncfs = libc.syncfs

        def failing_flush(path: str) -> None:
            raise OSError(5, "Input/output error", path)

        monkeypatch.setattr(libc, "syncfs", failing_flush)
        with pytest.raises(OSError):
            unpack_cached_layer(snap, layer.digest, right, len(raw))
        assert snap.unpacked_dir(layer.diff_id) is None and not any((snap.dir / "tmp").iterdir())
        flushed: list[tuple[list[str], Path | None]] = []

        def flush(path: str) -> None:
            flushed.append((sorted(p.name for p in (Path(path) / "fs").iterdir()), snap.unpacked_dir(layer.diff_id)))
            real_syncfs(path)

        monkeypatch.setattr(libc, "syncfs", flush)
        assert unpack_cached_layer(snap, layer.digest, right, len(raw)) == layer.diff_id
        assert len(flushed) == 1 and flushed[0][0] and flushed[0][1] is None, flushed
        assert sorted(p.name for p in snap.unpacked_dir(layer.diff_id).iterdir()) == flushed[0][0]
        assert unpack_cached_layer(snap, layer.digest, right, len(raw)) is None    # no snapshot waits now
        lowers = _lowers(snap, top)
        assert lowers[-1] == str(snap.unpacked_dir(layer.diff_id))     # the bottom layer, unpacked
        assert all(l.startswith(mnt) for l in lowers[:-1])
    finally:
        images.close()
        client.stop()


def test_with_unpacking_off_complete_layers_stay_on_their_views(registry, data_root, tmp_path):
    config = write_config(tmp_path / "c.yaml", background=True, quiet=0.2, interval_ms=5,
                          extra="  unpack_complete_layers: false\n")
    _tricky, images, snap, image = _pull(registry, tmp_path, data_root, "unpack/off", config)
    client = ServiceClient(DataRoot(data_root), config)
    try:
        deadline = time.monotonic() + 60
        while not all(l["percent"] == 100.0 for l in client.status()["layers"]):
            assert time.monotonic() < deadline, client.status()["layers"]
            time.sleep(0.1)
        time.sleep(1.5)      # with unpacking on, these small layers would be unpacked by now
        assert {l["unpack"] for l in client.status()["layers"]} == {""}
        top = snap.unpack_image(None, image)
        assert top is not None
        assert all(l.startswith(str(client.paths.mountpoint)) for l in _lowers(snap, top))
    finally:
        images.close()
        client.stop()
