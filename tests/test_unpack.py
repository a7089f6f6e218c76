"""Layer application: every format, every entry kind, and hostile layers that must touch nothing outside."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from helpers.images import Entry, Layer, make_layer, sha, tar_bytes
from helpers.tree import diff_trees, walk_tree
from helpers.tricky_image import CAPABILITY, layer1_entries
from lazyoci.errors import FormatError, UnsafeLayerError
from lazyoci.snapshot.unpack import OPAQUE_XATTR, apply_layer_stream


def _apply(layer: Layer, dest: Path, chunk: int | None = None) -> str:
    dest.mkdir(parents=True, exist_ok=True)
    src = layer.blob if chunk is None else [layer.blob[i:i + chunk] for i in range(0, len(layer.blob), chunk)]
    return apply_layer_stream(src, layer.media_type, dest).diff_id


def _gnu_tar_extract(raw: bytes, dest: Path) -> None:
    """GNU tar as the independent reference for a single layer (as root it keeps owners and modes)."""
    dest.mkdir()
    subprocess.run(["tar", "-x", "--xattrs", "--xattrs-include=*", "--same-owner", "-p", "--numeric-owner",
                    "-C", str(dest)], input=raw, check=True)


@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
@pytest.mark.parametrize("compression", ["gzip", "none", "zstd", "pigz"])
def test_formats_give_the_same_tree_as_gnu_tar(tmp_path, compression):
    entries = layer1_entries()
    raw = tar_bytes(entries)
    if compression == "pigz":
        # pigz writes independent blocks; two pigz runs concatenated make a multi-member stream.
        half = len(raw) // 2
        blob = b"".join(subprocess.run(["pigz", "-c", "-b", "128"], input=part, capture_output=True,
                                       check=True).stdout for part in (raw[:half], raw[half:]))
        layer = Layer(blob, sha(raw), "application/vnd.docker.image.rootfs.diff.tar.gzip")
    else:
        layer = make_layer(raw, compression)
    assert _apply(layer, tmp_path / "ours", chunk=4099) == sha(raw)
    _gnu_tar_extract(raw, tmp_path / "gnutar")
    problems = diff_trees(walk_tree(tmp_path / "gnutar", mtimes=True), walk_tree(tmp_path / "ours", mtimes=True))
    assert not problems, "\n".join(problems)
    assert os.getxattr(tmp_path / "ours/usr/bin/cap-tool", "security.capability") == CAPABILITY


@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
def test_whiteouts_become_overlay_markers(tmp_path):
    layer = make_layer([Entry("d", "dir"), Entry("d/.wh..wh..opq"), Entry("d/new", data=b"n"),
                        Entry(".wh.gone"), Entry("d/.wh.old")])
    _apply(layer, tmp_path / "l")
    assert os.getxattr(tmp_path / "l/d", OPAQUE_XATTR) == b"y"
    for wh in ("gone", "d/old"):
        st = os.lstat(tmp_path / "l" / wh)
        assert (st.st_mode & 0o170000) == 0o020000 and st.st_rdev == 0
    assert not (tmp_path / "l/.wh.gone").exists()
    assert (tmp_path / "l/d/new").read_bytes() == b"n"


@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
def test_layer_cannot_forge_overlay_xattrs(tmp_path):
    layer = make_layer([Entry("d", "dir", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"})])
    _apply(layer, tmp_path / "l")
    assert OPAQUE_XATTR not in os.listxattr(tmp_path / "l/d")


@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
def test_dir_mtimes_are_set_after_their_contents(tmp_path):
    layer = make_layer([Entry("a", "dir", mtime=1_000_000_000), Entry("a/b", "dir", mtime=1_100_000_000),
                        Entry("a/b/f", data=b"x", mtime=1_200_000_000)])
    _apply(layer, tmp_path / "l")
    assert os.stat(tmp_path / "l/a").st_mtime == 1_000_000_000
    assert os.stat(tmp_path / "l/a/b").st_mtime == 1_100_000_000


@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
def test_later_entries_replace_earlier_ones(tmp_path):
    layer = make_layer([Entry("x", data=b"one"), Entry("x", data=b"two"), Entry("y", "dir"),
                        Entry("y/inner", data=b"i"), Entry("y", "symlink", linkname="x")])
    _apply(layer, tmp_path / "l")
    assert (tmp_path / "l/x").read_bytes() == b"two"
    assert os.readlink(tmp_path / "l/y") == "x"


def test_unknown_media_type_is_refused(tmp_path):
    with pytest.raises(FormatError, match="unsupported layer media type"):
        apply_layer_stream(b"whatever", "application/vnd.example.layer+lz4", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_gzip_and_truncated_tar_are_format_errors(tmp_path):
    good = make_layer([Entry("f", data=os.urandom(100_000))])
    for d in "abc":
        (tmp_path / d).mkdir()
    with pytest.raises(FormatError):
        apply_layer_stream(good.blob[: len(good.blob) // 2], good.media_type, tmp_path / "a")
    with pytest.raises(FormatError):
        apply_layer_stream(b"\x1f\x8b" + b"garbage" * 100, good.media_type, tmp_path / "b")
    raw = tar_bytes([Entry("f", data=b"x" * 50_000)])
    with pytest.raises(FormatError):
        apply_layer_stream(raw[:20_000], "application/vnd.oci.image.layer.v1.tar", tmp_path / "c")


# ---- hostile layers: rejected, naming the entry, nothing outside touched ----------------------

def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "victim").write_text("original")
    return out


def _state(path: Path) -> dict:
    return walk_tree(path, mtimes=True)


HOSTILE = {
    "dotdot": ([Entry("a", "dir"), Entry("a/../../outside/victim", data=b"pwned")], "a/../../outside/victim"),
    "dotdot-new": ([Entry("../outside/new", data=b"pwned")], "../outside/new"),
    "absolute": ([Entry("/OUTSIDE/victim", data=b"pwned")], "/OUTSIDE/victim"),
    "symlink-dir-escape": ([Entry("esc", "symlink", linkname="/OUTSIDE"), Entry("esc/victim", data=b"pwned")],
                           "esc/victim"),
    "symlink-relative-escape": ([Entry("esc", "symlink", linkname="../../outside"),
                                 Entry("esc/new", data=b"pwned")], "esc/new"),
    "symlink-nested": ([Entry("d", "dir"), Entry("d/esc", "symlink", linkname="/OUTSIDE"),
                        Entry("d/esc/sub/new", "dir")], "d/esc/sub/new"),
    "hardlink-absolute": ([Entry("h", "hardlink", linkname="/OUTSIDE/victim")], "h"),
    "hardlink-dotdot": ([Entry("h", "hardlink", linkname="../../outside/victim")], "h"),
    "hardlink-through-symlink": ([Entry("esc", "symlink", linkname="/OUTSIDE"),
                                  Entry("h", "hardlink", linkname="esc/victim")], "h"),
    "symlink-then-whiteout": ([Entry("esc", "symlink", linkname="/OUTSIDE"), Entry("esc/.wh.victim")],
                              "esc/.wh.victim"),
    "symlink-then-opaque": ([Entry("esc", "symlink", linkname="/OUTSIDE"), Entry("esc/.wh..wh..opq")],
                            "esc/.wh..wh..opq"),
}


@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layer_is_rejected_and_touches_nothing_outside(tmp_path, case):
    outside = _outside(tmp_path)
    entries, culprit = HOSTILE[case]
    entries = [Entry(e.name.replace("/OUTSIDE", str(outside)), e.kind, e.data, e.mode, e.uid, e.gid,
                     e.linkname.replace("/OUTSIDE", str(outside)), e.devmajor, e.devminor, e.mtime, e.pax)
               for e in entries]
    culprit = culprit.replace("/OUTSIDE", str(outside))
    before = _state(tmp_path / "outside")
    before_xattrs = os.listxattr(outside)
    layer = make_layer(entries, "none")
    dest = tmp_path / "root" / "layer"
    dest.mkdir(parents=True)
    with pytest.raises(UnsafeLayerError) as info:
        apply_layer_stream(layer.blob, layer.media_type, dest)
    assert repr(culprit) in str(info.value)
    assert _state(tmp_path / "outside") == before
    assert os.listxattr(outside) == before_xattrs
    assert (outside / "victim").read_text() == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "root"]
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["layer"]


@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
def test_long_and_non_ascii_names_in_gnu_and_pax(tmp_path):
    long_dir = "/".join(["x" * 100] * 3)
    entries = [Entry(long_dir.split("/")[0], "dir"), Entry("/".join(long_dir.split("/")[:2]), "dir"),
               Entry(long_dir, "dir"), Entry(f"{long_dir}/{'f' * 200}", data=b"deep"),
               Entry("ünï-名前", data=b"u"), Entry("link", "symlink", linkname="t" * 300)]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        dest = tmp_path / str(fmt)
        _apply(make_layer(tar_bytes(entries, format=fmt), "gzip"), dest)
        assert (dest / long_dir / ("f" * 200)).read_bytes() == b"deep"
        assert (dest / "ünï-名前").read_bytes() == b"u"
        assert os.readlink(dest / "link") == "t" * 300


@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
def test_large_member_is_streamed(tmp_path):
    """A 64 MiB member through 64 KiB chunks: memory stays bounded (no whole-file buffering)."""
    size = 64 << 20
    header = tarfile.TarInfo("big")
    header.size = size
    head = header.tobuf(format=tarfile.PAX_FORMAT)
    pad = b"\0" * ((512 - size % 512) % 512) + b"\0" * 1024

    def stream():
        yield head
        block = b"\xab" * (1 << 16)
        for _ in range(size // len(block)):
            yield block
        yield pad

    import hashlib
    h = hashlib.sha256(head)
    block = b"\xab" * (1 << 16)
    for _ in range(size // len(block)):
        h.update(block)
    h.update(pad)
    got = apply_layer_stream(stream(), "application/vnd.oci.image.layer.v1.tar", tmp_path)
    assert got.diff_id == "sha256:" + h.hexdigest()
    assert (tmp_path / "big").stat().st_size == size


@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
def test_gzip_multimember_from_python(tmp_path):
    raw = tar_bytes([Entry("a", data=b"1" * 10000), Entry("b", data=b"2" * 10000)])
    blob = b"".join(gzip.compress(raw[i:i + 3000], mtime=0) for i in range(0, len(raw), 3000))
    layer = Layer(blob, sha(raw), "application/vnd.oci.image.layer.v1.tar+gzip")
    assert _apply(layer, tmp_path / "l", chunk=1000) == sha(raw)
    assert (tmp_path / "l/b").read_bytes() == b"2" * 10000


@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
def test_entries_replacing_a_planted_symlink_do_not_write_through_it(tmp_path):
    """A file, dir, device or hardlink entry at a path that is a symlink replaces the link itself."""
    outside = _outside(tmp_path)
    before = _state(outside)
    target = str(outside / "victim")
    entries = [Entry("inside", data=b"inside"),
               Entry("f", "symlink", linkname=target), Entry("f", data=b"pwned", mode=0o777),
               Entry("d", "symlink", linkname=str(outside)), Entry("d", "dir", mode=0o777, uid=1234),
               Entry("c", "symlink", linkname=target), Entry("c", "fifo", mode=0o777),
               Entry("h", "symlink", linkname=target), Entry("h", "hardlink", linkname="inside"),
               Entry("h", data=b"rewritten")]
    layer = make_layer(entries, "none")
    (tmp_path / "l").mkdir()
    apply_layer_stream(layer.blob, layer.media_type, tmp_path / "l")
    assert _state(outside) == before
    assert (tmp_path / "l/f").read_bytes() == b"pwned" and not os.path.islink(tmp_path / "l/f")
    assert (tmp_path / "l/d").is_dir() and not os.path.islink(tmp_path / "l/d")
    assert (tmp_path / "l/inside").read_bytes() == b"inside"    # the hardlink was replaced, not written through
    assert (tmp_path / "l/h").read_bytes() == b"rewritten"


@pytest.mark.slow
@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
def test_file_over_8_gib_is_streamed(tmp_path):
    """A member larger than the 8 GiB ustar limit (PAX size record), generated on the fly:
    nothing holds it in memory, and its zero runs become holes so the test needs no disk."""
    size = (8 << 30) + 12345
    header = tarfile.TarInfo("huge.img")
    header.size = size
    head = header.tobuf(format=tarfile.PAX_FORMAT)
    assert b"size=" in head                       # the size does not fit the ustar field
    zeros = bytes(1 << 20)
    tail = b"tail" + bytes(12345 - 4)
    end = b"\0" * ((512 - size % 512) % 512) + b"\0" * 1024

    def stream():
        yield head
        for _ in range(8 << 10):
            yield zeros
        yield tail
        yield end

    import hashlib
    import threading

    h = hashlib.sha256()

    def expected() -> None:  # hashed beside the unpack (hashlib releases the GIL)
        for part in stream():
            h.update(part)

    t = threading.Thread(target=expected)
    t.start()
    got = apply_layer_stream(stream(), "application/vnd.oci.image.layer.v1.tar", tmp_path)
    t.join()
    assert got.diff_id == "sha256:" + h.hexdigest()
    st = (tmp_path / "huge.img").stat()
    assert st.st_size == size
    assert st.st_blocks * 512 < 64 << 20            # sparse: the zeros were not written
    with open(tmp_path / "huge.img", "rb") as f:
        f.seek(8 << 30)
        assert f.read(4) == b"tail"


@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
def test_header_variants_ustar_prefix_base256_global_pax(tmp_path):
    """Header encodings tarfile writes: ustar name prefix, GNU base-256 numbers, PAX global headers
    (read, then dropped as containerd's unpacker drops them: docs/TAR.md)."""
    deep = "p" * 90 + "/" + "q" * 90 + "/file"          # > 100 bytes: ustar splits it into prefix + name
    ustar = tar_bytes([Entry("p" * 90, "dir"), Entry("p" * 90 + "/" + "q" * 90, "dir"),
                       Entry(deep, data=b"prefixed")], format=tarfile.USTAR_FORMAT)
    _apply(make_layer(ustar, "none"), tmp_path / "ustar")
    assert (tmp_path / "ustar" / deep).read_bytes() == b"prefixed"
    gnu = tar_bytes([Entry("big-ids", data=b"b", uid=3_000_000, gid=4_000_000)], format=tarfile.GNU_FORMAT)
    _apply(make_layer(gnu, "none"), tmp_path / "gnu")
    st = os.lstat(tmp_path / "gnu/big-ids")
    assert (st.st_uid, st.st_gid) == (3_000_000, 4_000_000)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"SCHILY.xattr.user.global": "everyone"}) as tf:
        for name in ("g1", "g2"):
            ti = tarfile.TarInfo(name)
            ti.size = 1
            tf.addfile(ti, io.BytesIO(b"g"))
    _apply(make_layer(buf.getvalue(), "none"), tmp_path / "global")
    for name in ("g1", "g2"):
        assert (tmp_path / "global" / name).read_bytes() == b"g"
        assert os.listxattr(tmp_path / "global" / name) == []


def test_bad_checksum_and_sparse_members_are_format_errors(tmp_path):
    raw = bytearray(tar_bytes([Entry("f", data=b"x")]))
    raw[0] ^= 1                                         # name byte changed: checksum no longer matches
    (tmp_path / "a").mkdir()
    with pytest.raises(FormatError, match="checksum"):
        apply_layer_stream(bytes(raw), "application/vnd.oci.image.layer.v1.tar", tmp_path / "a")
    sparse = tar_bytes([Entry("s", data=b"x", pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"})])
    (tmp_path / "b").mkdir()
    with pytest.raises(FormatError, match="sparse"):
        apply_layer_stream(sparse, "application/vnd.oci.image.layer.v1.tar", tmp_path / "b")



@pytest.mark.needs_root("unpacking sets owners, devices and trusted xattrs")
@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "fifo"])
def test_an_invalid_security_capability_xattr_fails_naming_the_entry_and_the_xattr(tmp_path, kind):
    """The kernel refuses a malformed security.capability (EINVAL); the unpack fails, as docker's does,
    with the entry and the xattr named (not "[Errno 22] Invalid argument: 4")."""
    entry = Entry("usr/bin/ping", kind, linkname="busybox" if kind == "symlink" else "",
                  pax={"SCHILY.xattr.security.capability": "\x01\x02\x03\x04"})
    layer = make_layer([Entry("usr", "dir"), Entry("usr/bin", "dir"), entry])
    with pytest.raises(FormatError) as info:
        _apply(layer, tmp_path / "l")
    message = str(info.value)
    assert "'usr/bin/ping'" in message and "security.capability" in message, message
    assert "Invalid argument" in message and "Errno" not in message, message
