"""The lazy layer filesystem through the real service: FUSE tree == unpacked tree, overlay == umoci."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from helpers.images import image_config, make_layer, push_image
from helpers.lazy import overlay, running_service, store_ztoc, write_config, ztoc_for
from helpers.tree import diff_trees, layer_tree, walk_tree
from helpers.tricky_image import push_tricky_image
from lazyoci.service.holder_link import holder_status
from lazyoci.service.paths import layer_view_name as view_name
from lazyoci.snapshot.unpack import apply_layer_stream

pytestmark = pytest.mark.needs_root("FUSE and overlay mounts")


@pytest.fixture
def tricky(registry, tmp_path):
    return push_tricky_image(registry.host, "lazy/tricky", tmp_path)


def _mount_all(client, root: Path, ref: str, layers) -> list[Path]:
    dirs = []
    for layer in layers:
        zdigest = store_ztoc(root, ztoc_for(layer, span_size=64 << 10))
        dirs.append(client.mount_layer(ref, layer.digest, zdigest))
    return dirs


def test_each_lazy_layer_equals_its_unpacked_tree(registry, tricky, data_root, tmp_path):
    """Every entry kind, attribute, xattr, hardlink group, whiteout and opaque dir of each layer."""
    ref = f"{registry.host}/lazy/tricky:latest"
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        dirs = _mount_all(client, data_root, ref, tricky.layers)
        for i, (layer, lazy_dir) in enumerate(zip(tricky.layers, dirs)):
            unpacked = tmp_path / f"unpacked{i}"
            unpacked.mkdir()
            apply_layer_stream([layer.blob], layer.media_type, unpacked)
            problems = diff_trees(layer_tree(unpacked), layer_tree(lazy_dir))
            assert not problems, f"layer {i + 1}:\n" + "\n".join(problems)
            # overlay's own markers (walk_tree ignores trusted.overlay.*): compare them too
            for dirpath, dirnames, _ in os.walk(unpacked):
                for d in dirnames:
                    rel = os.path.relpath(os.path.join(dirpath, d), unpacked)
                    want = _opaque(unpacked / rel)
                    assert _opaque(lazy_dir / rel) == want, f"layer {i + 1}: opaque marker of {rel}"
        listing = subprocess.run(["ls", "-a", str(dirs[0] / "etc")], capture_output=True, text=True,
                                 check=True).stdout.split()
        assert listing[:2] == [".", ".."] and "passwd" in listing
        whiteouts = [p for p in _walk(dirs[1]) if stat.S_ISCHR(os.lstat(p).st_mode)]
        assert whiteouts and all(os.lstat(p).st_rdev == 0 for p in whiteouts)
        status = client.status()
        assert {l["layer_digest"] for l in status["layers"]} == {l.digest for l in tricky.layers}


def test_overlay_of_lazy_layers_equals_umoci_unpack(registry, tricky, data_root, tmp_path):
    """The lazily mounted image, stacked by the kernel, is what umoci unpacks (every byte)."""
    bundle = tmp_path / "umoci-bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{tricky.layout}:latest", str(bundle)],
                   check=True, capture_output=True)
    ref = f"{registry.host}/lazy/tricky:latest"
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        dirs = _mount_all(client, data_root, ref, tricky.layers)
        with overlay(list(reversed(dirs)), tmp_path / "merged") as merged:
            problems = diff_trees(walk_tree(bundle / "rootfs", mtimes=True), walk_tree(merged, mtimes=True))
        assert not problems, "\n".join(problems)


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            yield os.path.join(dirpath, n)


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_600_000_000, 0o644
    return info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % 512)


def test_a_layer_with_a_global_pax_header_is_served_as_it_unpacks(registry, data_root, tmp_path):
    """A global PAX header between files applies to none of them (containerd's rule): the lazy view
    of such a layer equals its unpacked tree, every file readable (the header check of a file after
    the first following the `g` header used to see other attributes than the zTOC, hence EIO)."""
    glob = tarfile.TarInfo.create_pax_global_header({"SCHILY.xattr.user.g": "1", "mtime": "5"})
    raw = (_member("a", b"A" * 3000) + glob + _member("b", b"B" * 100) + _member("c", b"C" * 200)
           + bytes(1024))
    layer = make_layer(raw)
    push_image(registry.host, "lazy/global-pax", [layer], image_config([layer]), tmp_path)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    apply_layer_stream([layer.blob], layer.media_type, unpacked)
    assert os.listxattr(unpacked / "c") == []
    ref = f"{registry.host}/lazy/global-pax:latest"
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        (lazy_dir,) = _mount_all(client, data_root, ref, [layer])
        assert (lazy_dir / "c").read_bytes() == b"C" * 200
        problems = diff_trees(layer_tree(unpacked), layer_tree(lazy_dir))
        assert not problems, "\n".join(problems)


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_a_layer_with_zero_padding_after_its_end_blocks_is_served_whole(registry, data_root, tmp_path,
                                                                        compression):
    """tar's 10 KiB records and more zero padding after the end-of-archive blocks: the zTOC records
    the archive's end as the reference does, the spans still cover the padding, and the service
    serves the layer (it compares the last span's end with the archive size)."""
    raw = _member("a", b"A" * 70_000) + _member("b", b"B" * 100) + bytes(1024) + bytes(200 << 10)
    layer = make_layer(raw, compression)
    repo = f"lazy/padded-{compression}"
    push_image(registry.host, repo, [layer], image_config([layer]), tmp_path)
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        (lazy_dir,) = _mount_all(client, data_root, f"{registry.host}/{repo}:latest", [layer])
        assert (lazy_dir / "a").read_bytes() == b"A" * 70_000
        assert (lazy_dir / "b").read_bytes() == b"B" * 100
        assert sorted(os.listdir(lazy_dir)) == ["a", "b"]


def test_what_the_kernel_may_keep_of_a_lazy_layer(registry, tricky, data_root, tmp_path):
    """A layer's tree never changes, so the kernel keeps its absent names too, and reads ahead a
    whole FUSE request (1 MiB); the mount root, where layers come and go, keeps no absent name.
    overlayfs' own xattrs are never a layer's: the session holder answers them itself, the service
    only the opaque marker."""
    ref = f"{registry.host}/lazy/tricky:latest"
    first, second = tricky.layers[:2]
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        (lazy_dir,) = _mount_all(client, data_root, ref, [first])
        mnt = lazy_dir.parent
        dev = os.stat(mnt).st_dev
        kib = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()
        assert int(kib) == 1024
        for _ in range(2):
            with pytest.raises(FileNotFoundError):
                os.lstat(lazy_dir / "no-such-name")
            with pytest.raises(FileNotFoundError):
                os.lstat(lazy_dir / "etc" / "no-such-name")
        zdigest = store_ztoc(data_root, ztoc_for(second, span_size=64 << 10))
        later = mnt / view_name(second.digest, zdigest)
        assert not later.exists()
        assert client.mount_layer(ref, second.digest, zdigest) == later
        assert later.is_dir()
        answered = holder_status(client.holder)["answered"]
        for path in (lazy_dir / "etc", lazy_dir / "etc" / "passwd"):
            for name in ("trusted.overlay.metacopy", "trusted.overlay.redirect", "trusted.overlay.origin"):
                with pytest.raises(OSError) as exc:
                    os.getxattr(path, name, follow_symlinks=False)
                assert exc.value.errno == errno.ENODATA, (path, name)
        assert holder_status(client.holder)["answered"] == answered + 6    # no round trip to the service
        opaque = [Path(d) for d, _, _ in os.walk(later) if _opaque(Path(d))]
        assert opaque, "the second layer of the tricky image has an opaque directory"


def _relayed(client) -> dict[str, int]:
    """FUSE requests the holder relayed to the service so far, by opcode number."""
    return {k: v[0] for k, v in holder_status(client.holder)["opcodes"].items()}


def test_opens_and_closes_never_reach_the_service(registry, tricky, data_root, tmp_path):
    """The kernel opens files and directories of the mount without a message (the holder answers
    its first OPEN and OPENDIR with ENOSYS): no OPEN, RELEASE, OPENDIR or RELEASEDIR reaches the
    service, reads and listings still do (with the node's own handle) and give the layer's bytes,
    a file's pages and a directory's listing outlive its close, a symlink's target is kept, and
    a listing of the mount root shows the layers mounted and unmounted since the last one."""
    ref = f"{registry.host}/lazy/tricky:latest"
    first, second = tricky.layers[:2]
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        (lazy_dir,) = _mount_all(client, data_root, ref, [first])
        mnt = lazy_dir.parent
        before = _relayed(client)
        for _ in range(3):
            assert (lazy_dir / "etc" / "hostname").read_bytes() == b"tricky\n"
            assert "passwd" in os.listdir(lazy_dir / "etc")
            assert os.readlink(lazy_dir / "bin" / "sh") == "busybox"
        after = _relayed(client)
        opened = {op: after.get(op, 0) - before.get(op, 0) for op in ("14", "18", "27", "29")}
        assert opened == {"14": 0, "18": 0, "27": 0, "29": 0}, opened    # OPEN RELEASE OPENDIR RELEASEDIR
        assert after.get("15", 0) - before.get("15", 0) == 1             # READ: the pages stay
        assert after.get("5", 0) - before.get("5", 0) == 1               # READLINK: the target stays
        listed = sum(after.get(op, 0) - before.get(op, 0) for op in ("28", "44"))
        assert 1 <= listed <= 2                                           # READDIR(PLUS): the listing stays
        assert os.listdir(mnt) == [lazy_dir.name]
        zdigest = store_ztoc(data_root, ztoc_for(second, span_size=64 << 10))
        later = client.mount_layer(ref, second.digest, zdigest)
        assert sorted(os.listdir(mnt)) == sorted([lazy_dir.name, later.name])
        assert client.unmount_layer(first.digest, store_ztoc(data_root, ztoc_for(first, span_size=64 << 10)))
        assert os.listdir(mnt) == [later.name]


def test_layers_without_xattrs_are_served_where_the_kernel_asks_for_none(registry, data_root, tmp_path):
    """A layer with no xattr and no opaque directory is shown in the plain mount too, and overlays
    stack it from there (`lower_dir`): the kernel asks that mount for no xattr after the holder's
    first ENOSYS, so a getxattr there is EOPNOTSUPP (the reference's answer for a layer marked
    `disable-xattrs`) and a listxattr lists none. A layer with an xattr, or an opaque directory,
    is served in the mount alone, with both; the overlay of the three is what they unpack to, and
    a layer unmounted leaves both mounts' roots at once."""
    from helpers.images import Entry

    below = make_layer([Entry("plain", "dir"), Entry("plain/file", data=b"p" * 5000),
                        Entry("o", "dir"), Entry("o/hidden", data=b"h")])
    with_xattr = make_layer([Entry("x", "dir"), Entry("x/file", data=b"x" * 5000,
                                                        pax={"SCHILY.xattr.user.k": "v"})])
    opaque = make_layer([Entry("o", "dir"), Entry("o/.wh..wh..opq"), Entry("o/file", data=b"o")])
    layers = [below, with_xattr, opaque]
    push_image(registry.host, "lazy/plain", layers, image_config(layers), tmp_path)
    ref = f"{registry.host}/lazy/plain:latest"
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        zdigests = [store_ztoc(data_root, ztoc_for(l, span_size=64 << 10)) for l in layers]
        views = [client.mount_layer(ref, l.digest, z) for l, z in zip(layers, zdigests)]
        plain_mnt = client.paths.plain_mountpoint
        assert os.listdir(plain_mnt) == [views[0].name]
        lowers = [client.lower_dir(l.digest, z) for l, z in zip(layers, zdigests)]
        assert lowers == [plain_mnt / views[0].name, views[1], views[2]]

        assert (lowers[0] / "plain" / "file").read_bytes() == b"p" * 5000
        before = holder_status(client.holder)["opcodes"].get("22", [0, 0])
        for _ in range(10):
            with pytest.raises(OSError) as exc:
                os.getxattr(lowers[0] / "plain" / "file", "trusted.overlay.metacopy")
            assert exc.value.errno == errno.EOPNOTSUPP
        after = holder_status(client.holder)["opcodes"].get("22", [0, 0])
        assert (after[0] - before[0], after[1] - before[1]) in ((0, 0), (0, 1))   # one ENOSYS at most
        assert os.listxattr(lowers[0] / "plain" / "file") == []

        with overlay(list(reversed(lowers)), tmp_path / "merged") as merged:
            assert sorted(os.listdir(merged / "o")) == ["file"]      # the opaque directory hides o/hidden
            assert os.getxattr(merged / "x" / "file", "user.k") == b"v"
            assert (merged / "plain" / "file").read_bytes() == b"p" * 5000
            with pytest.raises(OSError) as exc:
                os.getxattr(merged / "plain" / "file", "user.k")
            assert exc.value.errno == errno.EOPNOTSUPP

        assert client.unmount_layer(layers[0].digest, zdigests[0])
        assert os.listdir(plain_mnt) == [] and views[0].name not in os.listdir(views[0].parent)
        assert client.lower_dir(layers[0].digest, zdigests[0]) == views[0]
