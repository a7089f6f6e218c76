"""A multi-layer "tricky" image that exercises every corner of layer application.

Built with Python's tarfile (not by lazyoci), so tests compare lazyoci against an
independent producer — and against `umoci unpack` as an independent consumer.
Importable by every area (the overlayfs snapshotter tests and the lazy-loading tree
comparison use the same image):

    from helpers.tricky_image import build_tricky_image, push_tricky_image
    img = build_tricky_image(tmp_path)            # OCI layout at img.layout, tag "latest"
    digest = push_tricky_image(registry.host, "tricky", tmp_path)

The image is also runnable: its base layer carries a static busybox at /bin/busybox
with applet symlinks, /etc/passwd and /etc/group (users root, app 1000:1000 in
groups app, wheel and extra), Cmd ["/bin/sh", "-c", "echo tricky"].

What it contains, by layer:
  1 (tar+gzip, PAX): busybox + applets; every entry kind (file, dir, symlink
    relative/absolute/dangling, hardlinks across directories, char and block
    devices, fifo); modes setuid/setgid/sticky/0000; uid/gid 1000/2000/65534;
    xattrs user.* and security.capability; names longer than 100 and paths longer
    than 255 bytes (PAX path); non-ASCII names; an empty file; directories that
    later layers delete or make opaque.
  2 (tar+gzip as TWO gzip members, like pigz output): whiteouts of a file, of a
    directory and of a hardlinked name's sibling, an opaque directory with new
    content, a file replaced by a directory, a directory replaced by a symlink,
    changed content and mode of existing files, a new hardlink across directories.
  3 (plain tar, GNU format): GNU long names and long link targets, a file
    re-created after its whiteout, a whiteout of a layer-1 directory tree.
"""

from __future__ import annotations

import gzip
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from helpers.images import (LAYER_GZIP, Entry, Layer, make_layer, sha, skopeo_push_layout,
                            tar_bytes, write_oci_layout)

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "id", "env", "pwd", "sleep", "ls", "true", "false", "kill",
           "touch", "stat", "whoami", "printf", "test", "head", "wc", "sha256sum", "readlink", "grep")
PASSWD = (b"root:x:0:0:root:/root:/bin/sh\n"
          b"daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
          b"app:x:1000:1000:App User:/home/app:/bin/sh\n"
          b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = (b"root:x:0:\n"
         b"wheel:x:10:app\n"
         b"app:x:1000:\n"
         b"extra:x:2000:daemon,app\n"
         b"nogroup:x:65534:\n")
# A valid VFS_CAP_REVISION_2 security.capability value granting cap_net_bind_service (bit 10).
CAPABILITY = b"\x00\x00\x00\x02" + (1 << 10).to_bytes(4, "little") + b"\x00" * 12
LONG_NAME = "long-" + "n" * 120 + ".txt"                      # > 100 bytes: needs PAX/GNU
DEEP_DIR = "deep/" + "/".join(["d" * 60] * 4)                # path > 255 bytes
NON_ASCII_DIR = "données"
NON_ASCII_FILE = "données/ünïcödé-☃-名前.txt"
CMD = ["/bin/sh", "-c", "echo tricky"]


def _x(value: bytes) -> str:
    """A PAX value that carries arbitrary bytes (tarfile writes it with hdrcharset=BINARY)."""
    return value.decode("utf-8", "surrogateescape")


def _dirs(*names: str, mode: int = 0o755) -> list[Entry]:
    return [Entry(n, "dir", mode=mode) for n in names]


def layer1_entries() -> list[Entry]:
    bb = BUSYBOX.read_bytes()
    e = _dirs("bin", "etc", "usr", "usr/bin", "usr/lib", "dev", "home", "var", "var/log",
              "opaque", "opaque/sub", "gone-dir", "gone-dir/inner", "replace-me-dir", "tree",
              "tree/a", "tree/a/b", "links", "links/x", "links/y", "deep", NON_ASCII_DIR, "misc")
    e += [Entry("root", "dir", mode=0o700), Entry("tmp", "dir", mode=0o1777),
          Entry("home/app", "dir", mode=0o750, uid=1000, gid=1000),
          Entry("srv", "dir", mode=0o2775, uid=0, gid=2000)]          # setgid directory
    e += [Entry("bin/busybox", data=bb, mode=0o755)]
    e += [Entry(f"bin/{a}", "symlink", linkname="busybox") for a in APPLETS]
    e += [Entry("etc/passwd", data=PASSWD), Entry("etc/group", data=GROUP),
          Entry("etc/hostname", data=b"tricky\n"),
          Entry("etc/motd", data=b"layer one\n"),
          Entry("etc/shadow", data=b"root:*:19000:0:99999:7:::\n", mode=0o640, gid=42)]
    d = ["/".join(DEEP_DIR.split("/")[:i]) for i in range(2, len(DEEP_DIR.split("/")) + 1)]
    e += _dirs(*d)
    e += [
        Entry("usr/bin/setuid-tool", data=b"#!/bin/sh\necho suid\n", mode=0o4755),
        Entry("usr/bin/setgid-tool", data=b"#!/bin/sh\necho sgid\n", mode=0o2711, gid=2000),
        Entry("usr/bin/cap-tool", data=b"caps\n", mode=0o755,
              pax={"SCHILY.xattr.security.capability": _x(CAPABILITY)}),
        Entry("misc/xattrs", data=b"has xattrs\n",
              pax={"SCHILY.xattr.user.comment": "hello", "SCHILY.xattr.user.binary": _x(b"\x00\xff\x10bin")}),
        Entry("misc/empty", data=b""),
        Entry("misc/no-perms", data=b"secret", mode=0o000),
        Entry("misc/owned", data=b"owned\n", uid=1000, gid=1000, mode=0o600),
        Entry("misc/nobody", data=b"nobody\n", uid=65534, gid=65534),
        Entry("misc/big-uid", data=b"big\n", uid=2_000_000, gid=3_000_000),
        Entry("misc/exact-mtime", data=b"t\n", mtime=1_234_567_890),
        Entry(f"misc/{LONG_NAME}", data=b"long name\n"),
        Entry(f"{DEEP_DIR}/deep-file.txt", data=b"deep\n"),
        Entry(NON_ASCII_FILE, data="ünïcödé\n".encode()),
        Entry("misc/rel-link", "symlink", linkname="../etc/motd"),
        Entry("misc/abs-link", "symlink", linkname="/etc/passwd"),
        Entry("misc/dangling", "symlink", linkname="/nonexistent/target"),
        Entry("misc/dir-link", "symlink", linkname="../tree"),
        Entry("misc/owned-link", "symlink", linkname="owned", uid=1000, gid=1000),
        Entry("links/x/original", data=b"shared inode\n", mode=0o640, uid=1000, gid=2000),
        Entry("links/y/hard-across", "hardlink", linkname="links/x/original"),
        Entry("links/hard-top", "hardlink", linkname="links/x/original"),
        Entry("dev/null", "char", mode=0o666, devmajor=1, devminor=3),
        Entry("dev/zero", "char", mode=0o666, devmajor=1, devminor=5),
        Entry("dev/loop-blk", "block", mode=0o660, devmajor=7, devminor=0, gid=6),
        Entry("var/log/pipe", "fifo", mode=0o620),
        Entry("opaque/lower-only", data=b"hidden by opaque\n"),
        Entry("opaque/sub/lower-nested", data=b"hidden too\n"),
        Entry("gone-dir/inner/file", data=b"deleted later\n"),
        Entry("etc/to-delete", data=b"deleted later\n"),
        Entry("replace-me", data=b"file that becomes a directory\n"),
        Entry("replace-me-dir/content", data=b"dir that becomes a symlink\n"),
        Entry("tree/a/b/leaf", data=b"leaf\n"),
        Entry("tree/a/keep", data=b"keep\n"),
    ]
    return e


def layer2_entries() -> list[Entry]:
    return _dirs("etc", "opaque", "links", "links/z", "misc", "usr", "usr/bin", "tree", "tree/a") + [
        Entry("etc/.wh.to-delete"),
        Entry(".wh.gone-dir"),
        Entry("opaque/.wh..wh..opq"),
        Entry("opaque/upper-file", data=b"only this survives\n"),
        Entry("etc/motd", data=b"layer two\n", mode=0o600),
        Entry("usr/bin/setuid-tool", data=b"#!/bin/sh\necho suid v2\n", mode=0o4750, gid=10),
        Entry(".wh.replace-me"),
        Entry("replace-me", "dir", mode=0o700),
        Entry("replace-me/now-a-dir", data=b"inside\n"),
        Entry(".wh.replace-me-dir"),
        Entry("replace-me-dir", "symlink", linkname="tree/a"),
        Entry("links/z/second", data=b"layer-two inode\n", uid=1000),
        Entry("links/second-hard", "hardlink", linkname="links/z/second"),
        Entry("tree/a/.wh.keep"),
        Entry("misc/layer2-xattr", data=b"x\n", pax={"SCHILY.xattr.user.layer": "2"}),
        Entry("sticky", "dir", mode=0o1755, uid=1000),
    ]


def layer3_entries() -> list[Entry]:
    return _dirs("etc", "gnu", "tree") + [
        Entry("etc/to-delete", data=b"back again in layer 3\n"),
        Entry("gnu/" + "g" * 150, data=b"gnu long name\n"),
        Entry("gnu/long-target-link", "symlink", linkname="/" + "/".join(["t" * 50] * 3)),
        Entry("tree/.wh.a"),
        Entry("tree/new", data=b"new in three\n", mode=0o700, uid=2000, gid=2000),
    ]


def _two_member_gzip(raw: bytes) -> Layer:
    """tar+gzip as two concatenated gzip members (what pigz and some builders emit)."""
    cut = len(raw) // 3
    blob = gzip.compress(raw[:cut], mtime=0) + gzip.compress(raw[cut:], mtime=0)
    return Layer(blob, sha(raw), LAYER_GZIP)


def tricky_layers() -> list[Layer]:
    return [
        make_layer(layer1_entries(), "gzip"),
        _two_member_gzip(tar_bytes(layer2_entries())),
        make_layer(tar_bytes(layer3_entries(), format=tarfile.GNU_FORMAT), "none"),
    ]


def tricky_config(layers: list[Layer]) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                           "TRICKY=yes"],
                   "Cmd": CMD, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
        "history": [{"created_by": f"tricky layer {i + 1}"} for i in range(len(layers))],
    }, sort_keys=True).encode()


@dataclass
class TrickyImage:
    layout: Path          # an OCI image layout (tag "latest")
    layers: list[Layer]
    config: bytes
    manifest_digest: str


def build_tricky_image(workdir: Path, tag: str = "latest") -> TrickyImage:
    layers = tricky_layers()
    config = tricky_config(layers)
    layout = workdir / "tricky-layout"
    digest = write_oci_layout(layout, layers, config, tag)
    return TrickyImage(layout, layers, config, digest)


def push_tricky_image(registry_host: str, repo: str, workdir: Path, tag: str = "latest") -> TrickyImage:
    img = build_tricky_image(workdir, tag)
    skopeo_push_layout(img.layout, f"{registry_host}/{repo}:{tag}", tag)
    return img
