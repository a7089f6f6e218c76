"""The overlayfs snapshotter: the tricky image's tree equals umoci's, layers are shared and released."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.tree import diff_trees, walk_tree
from helpers.tricky_image import push_tricky_image
from lazyoci.config import Config
from lazyoci.errors import IntegrityError, StoreError
from lazyoci.images.service import ImageService
from lazyoci.snapshot.base import KIND_ACTIVE, KIND_COMMITTED, Snapshotter
from lazyoci.snapshot.mount_syscall import is_mountpoint, mount_all, unmount
from lazyoci.snapshot.overlay import OverlaySnapshotter
from lazyoci.snapshot.snapshotters import get_snapshotter
from lazyoci.store.layout import DataRoot

pytestmark = pytest.mark.needs_root("overlay mounts and layers owned by root")

LAZYOCI = [str(Path(sys.executable).parent / "lazyoci")]


def lz(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(LAZYOCI + ["--root", str(root), *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"lazyoci {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [l.split()[4] for l in f if l.split()[4].startswith(str(path))]


@pytest.fixture
def no_mounts_left(data_root):
    yield data_root
    left = _mounts_under(data_root.parent)
    for m in reversed(left):
        unmount(Path(m))
    assert not left, f"mounts left behind: {left}"


def _write_hello(snap: Snapshotter, key: str, parent: str | None, target: Path) -> Path:
    """Prepare the active snapshot `key` on `parent`, write /hello in it through its mount; returns
    the (unmounted) mount point."""
    target.mkdir()
    mount_all(snap.prepare(key, parent), target)
    try:
        (target / "hello").write_text("world")
    finally:
        unmount(target)
    return target


def test_image_mount_of_the_tricky_image_equals_umoci_unpack(registry, tmp_path, no_mounts_left):
    root = no_mounts_left
    img = push_tricky_image(registry.host, "snap/tricky", tmp_path)
    subprocess.run(["umoci", "unpack", "--image", f"{img.layout}:latest", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    ref = f"{registry.host}/snap/tricky:latest"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = lz(root, "image", "mount", ref, str(mnt))          # pulls (progress on stderr), then mounts
    assert "layer-sha256:" in r.stderr and r.stdout == ""
    try:
        assert is_mountpoint(mnt)
        expected = walk_tree(tmp_path / "bundle" / "rootfs", mtimes=True)
        actual = walk_tree(mnt, mtimes=True)
        problems = diff_trees(expected, actual)
        assert not problems, "\n".join(problems)
        assert len(actual) > 80
        # read-only
        with pytest.raises(OSError):
            (mnt / "newfile").write_text("x")
    finally:
        lz(root, "image", "unmount", str(mnt))
    assert not is_mountpoint(mnt)
    snap = OverlaySnapshotter(DataRoot(root))
    assert [s.kind for s in snap.walk()] == [KIND_COMMITTED] * 3


def test_layers_unpack_during_pull_and_are_shared_and_released(registry, tmp_path, no_mounts_left):
    root = DataRoot(no_mounts_left)
    base = make_layer([Entry("bin", "dir"), Entry("bin/base", data=b"base" * 1000)])
    top_a = make_layer([Entry("a", data=b"image a")], "zstd")
    top_b = make_layer([Entry("b", data=b"image b")], "none")
    push_image(registry.host, "snap/a", [base, top_a], image_config([base, top_a], cmd=["/x"]), tmp_path)
    push_image(registry.host, "snap/b", [base, top_b], image_config([base, top_b], cmd=["/x"]), tmp_path)
    images = ImageService(root)
    snap = OverlaySnapshotter(root)
    a = images.pull(f"{registry.host}/snap/a:latest", layer_consumer=snap.layer_consumer)
    # Unpacked while downloading: the layer dirs exist before unpack_image, so it needs no blobs.
    assert snap.unpacked_dir(base.diff_id) is not None and snap.unpacked_dir(top_a.diff_id) is not None
    for layer in (base, top_a):
        images.blobs.delete(layer.digest)
    top = snap.unpack_image(images, a)
    b = images.pull(f"{registry.host}/snap/b:latest", layer_consumer=snap.layer_consumer)
    snap.unpack_image(images, b)
    dirs = sorted(p.name for p in (root.snapshots / "overlayfs").iterdir() if p.name.isdigit())
    assert len(dirs) == 3     # base once, two tops
    committed = {s.key: s for s in snap.walk()}
    assert top in committed and len(committed) == 3   # chains: base (shared), base+a, base+b
    # A container-like active snapshot keeps its chain alive.
    mounts = snap.prepare("c1", top)
    target = tmp_path / "rootfs"
    target.mkdir()
    mount_all(mounts, target)
    try:
        assert (target / "a").read_bytes() == b"image a"
        assert (target / "bin/base").read_bytes() == b"base" * 1000
        (target / "written").write_text("upper")
    finally:
        unmount(target)
    with pytest.raises(StoreError):
        snap.remove(top)                      # has a child (the active snapshot)
    removed = snap.release_unused(keep=set())
    assert top not in removed and len(removed) == 1   # only base+b could go
    snap.remove("c1")
    removed = snap.release_unused(keep=set())
    assert top in removed
    assert [p.name for p in (root.snapshots / "overlayfs").iterdir() if p.name.isdigit()] == []


def test_rmi_releases_unpacked_layers(registry, tmp_path, no_mounts_left):
    root = no_mounts_left
    layer = make_layer([Entry("only", data=b"x")])
    push_image(registry.host, "snap/rmi", [layer], image_config([layer], cmd=["/x"]), tmp_path)
    ref = f"{registry.host}/snap/rmi:latest"
    lz(root, "pull", ref)
    snapdir = root / "snapshots" / "overlayfs"
    assert [p for p in snapdir.iterdir() if p.name.isdigit()]
    lz(root, "rmi", ref)
    assert [p for p in snapdir.iterdir() if p.name.isdigit()] == []


def test_wrong_diff_id_in_config_is_an_integrity_error(registry, tmp_path, no_mounts_left):
    root = DataRoot(no_mounts_left)
    layer = make_layer([Entry("f", data=b"real")])
    other = make_layer([Entry("f", data=b"claimed")])
    push_image(registry.host, "snap/lie", [layer], image_config([other], cmd=["/x"]), tmp_path)
    images = ImageService(root)
    snap = get_snapshotter("overlayfs", root, Config())
    image = images.pull(f"{registry.host}/snap/lie:latest", layer_consumer=snap.layer_consumer)
    with pytest.raises(IntegrityError, match="diff ID"):
        snap.unpack_image(images, image)
    assert list(snap.walk()) == []


def test_with_unpack_sync_fs_layers_reach_the_disk_before_their_snapshots(registry, tmp_path, no_mounts_left,
                                                                        monkeypatch):
    """`unpack_sync_fs: true`: every layer a pull unpacks is flushed (syncfs) while it is still a
    staging directory, and an active snapshot committed as a layer while it is still active;
    without the setting nothing is flushed."""
    from lazyoci.snapshot import layered

    base = make_layer([Entry("bin", "dir"), Entry("bin/base", data=b"base" * 1000)])
    top = make_layer([Entry("top", data=b"top")], "zstd")
    push_image(registry.host, "snap/sync", [base, top], image_config([base, top], cmd=["/x"]), tmp_path)
    ref = f"{registry.host}/snap/sync:latest"
    flushed: list[tuple[Path, list[str], str | None]] = []
    real = layered.libc.syncfs

    def flush(path: str) -> None:
        where = Path(path)
        tree = where / "fs" if (where / "fs").is_dir() else where
        active = snap.stat("work").kind if any(s.key == "work" for s in snap.walk()) else None
        flushed.append((where.parent, sorted(os.listdir(tree)), active))
        real(path)

    monkeypatch.setattr(layered.libc, "syncfs", flush)
    for sync_fs, root in ((False, DataRoot(no_mounts_left)), (True, DataRoot(tmp_path / "synced"))):
        images = ImageService(root)
        snap = get_snapshotter("overlayfs", root, Config(unpack_sync_fs=sync_fs))
        try:
            image = images.pull(ref, layer_consumer=snap.layer_consumer)
            top_key = snap.unpack_image(images, image)
            assert top_key is not None
            if not sync_fs:
                assert flushed == []              # off by default, as in containerd
                continue
            assert sorted(flushed) == [(snap.dir / "tmp", ["bin"], None), (snap.dir / "tmp", ["top"], None)]
            flushed.clear()
            _write_hello(snap, "work", top_key, tmp_path / "m")
            snap.commit("layer", "work")
            assert [(names, active) for _, names, active in flushed] == [(["hello"], KIND_ACTIVE)]
            snap.remove("layer")
        finally:
            images.close()


def test_commit_an_active_snapshot_as_a_layer(tmp_path, no_mounts_left):
    root = DataRoot(no_mounts_left)
    snap = OverlaySnapshotter(root)
    target = _write_hello(snap, "work", None, tmp_path / "m")
    assert snap.stat("work").kind == KIND_ACTIVE
    snap.commit("layer1", "work")
    assert snap.stat("layer1").kind == KIND_COMMITTED
    with pytest.raises(StoreError):
        snap.stat("work")
    mount_all(snap.view("v", "layer1"), target)
    try:
        assert (target / "hello").read_text() == "world"
    finally:
        unmount(target)
    snap.remove("v")
    snap.remove("layer1")
    assert list(snap.walk()) == []


def test_pulling_a_hostile_image_fails_and_writes_nothing_outside(registry, tmp_path, no_mounts_left):
    root = no_mounts_left
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("original")
    bad = make_layer([Entry("etc", "dir"), Entry("etc/esc", "symlink", linkname=str(victim)),
                      Entry("etc/esc/file", data=b"pwned"), Entry("etc/esc/new", data=b"pwned")])
    push_image(registry.host, "snap/hostile", [bad], image_config([bad], cmd=["/x"]), tmp_path)
    ref = f"{registry.host}/snap/hostile:latest"
    r = lz(root, "pull", ref, check=False)
    assert r.returncode != 0
    assert "etc/esc/file" in r.stderr and "symlink" in r.stderr
    r = lz(root, "run", "--rm", ref, check=False)
    assert r.returncode != 0 and "etc/esc/file" in r.stderr
    assert sorted(p.name for p in victim.iterdir()) == ["file"]
    assert (victim / "file").read_text() == "original"
    snapdir = root / "snapshots" / "overlayfs"
    assert list((snapdir / "tmp").iterdir()) == []              # the partial layer is gone
    assert [p for p in snapdir.iterdir() if p.name.isdigit()] == []
    assert not (root / "containers").exists() or list((root / "containers").iterdir()) == []


def _desc(layer):
    from lazyoci.oci.manifest import Descriptor
    return Descriptor(layer.media_type, layer.digest, len(layer.blob))


def test_layer_consumers_unpack_concurrently_abort_and_fail_cleanly(tmp_path, no_mounts_left):
    import threading

    from lazyoci.errors import UnsafeLayerError

    root = DataRoot(no_mounts_left)
    snap = OverlaySnapshotter(root)
    layers = [make_layer([Entry(f"f{i}", data=os.urandom(300_000))], c)
              for i, c in enumerate(("gzip", "zstd", "none"))]
    consumers = [snap.layer_consumer(_desc(l)) for l in layers]

    def feed(consumer, blob):
        for i in range(0, len(blob), 8192):
            consumer.write(blob[i:i + 8192])
        consumer.finish()

    threads = [threading.Thread(target=feed, args=(c, l.blob)) for c, l in zip(consumers, layers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    for i, l in enumerate(layers):
        assert (snap.unpacked_dir(l.diff_id) / f"f{i}").stat().st_size == 300_000
        assert snap.layer_consumer(_desc(l)) is None      # already unpacked: nothing to do next time
    # Unpacked but not committed yet (a pull in flight): `rmi` elsewhere must not remove them.
    snap.release_unused(keep=set())
    assert all(snap.unpacked_dir(l.diff_id) is not None for l in layers)

    big = make_layer([Entry("big", data=os.urandom(2_000_000))], "none")
    c = snap.layer_consumer(_desc(big))
    c.write(big.blob[:500_000])
    c.abort(RuntimeError("download failed"))
    assert snap.unpacked_dir(big.diff_id) is None

    evil = make_layer([Entry("esc", "symlink", linkname="/"), Entry("esc/pwned", data=b"x")], "none")
    c = snap.layer_consumer(_desc(evil))
    with pytest.raises(UnsafeLayerError, match="esc/pwned"):
        for i in range(0, len(evil.blob), 512):
            c.write(evil.blob[i:i + 512])
        c.finish()
    c.abort(RuntimeError("pull failed"))
    assert not Path("/pwned").exists()
    assert list((root.snapshots / "overlayfs" / "tmp").iterdir()) == []
