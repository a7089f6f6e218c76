"""Walk a directory tree into comparable records, and diff two such walks.

Used to check that what lazyoci shows (an overlay mount, a FUSE lazy mount) is
the same tree an independent tool (`umoci unpack`) produces for the same image:

    from helpers.tree import walk_tree, diff_trees
    problems = diff_trees(walk_tree(umoci_rootfs), walk_tree(lazyoci_mount))
    assert not problems, "\n".join(problems)

Per entry: type, permission bits (incl. setuid/setgid/sticky), uid, gid, size and
sha256 of regular files, symlink target, device major/minor, xattrs (except the
ones the kernel or overlayfs manage: security.selinux, trusted.overlay.*), and
optionally mtime of non-directories and hardlink groups. Nothing is followed
through symlinks; names are compared as bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

IGNORED_XATTRS = ("security.selinux", "trusted.overlay.")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def _sha(path: bytes) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _xattrs(path: bytes) -> dict[str, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for n in names:
        if n.startswith(IGNORED_XATTRS):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
    return out


def walk_tree(root: Path, mtimes: bool = False, hardlinks: bool = True) -> dict[bytes, dict]:
    """Records of every entry below root (root itself excluded), keyed by relative path bytes."""
    base = os.fsencode(str(root))
    out: dict[bytes, dict] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            kind = _kind(st.st_mode)
            rec: dict = {"type": kind, "mode": oct(stat.S_IMODE(st.st_mode)),
                         "uid": st.st_uid, "gid": st.st_gid, "xattrs": _xattrs(full)}
            if kind == "file":
                rec["size"] = st.st_size
                rec["sha256"] = _sha(full)
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif kind == "symlink":
                rec["target"] = os.readlink(full)
            elif kind in ("char", "block"):
                rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if mtimes and kind != "dir":
                rec["mtime"] = int(st.st_mtime)
            out[rel] = rec
    if hardlinks:
        for group in inodes.values():
            names = sorted(group)
            for rel in names:
                out[rel]["hardlinks"] = names
    return out


def layer_tree(root: Path) -> dict[bytes, dict]:
    """walk_tree of a layer with mtimes, except of whiteouts (an unpacker creates them "now"):
    what an unpacked layer and its lazy view must agree on."""
    tree = walk_tree(root, mtimes=True)
    for rec in tree.values():
        if rec["type"] == "char" and rec.get("rdev") == (0, 0):
            rec.pop("mtime", None)
    return tree


def diff_trees(expected: dict[bytes, dict], actual: dict[bytes, dict], limit: int = 50) -> list[str]:
    """Human-readable differences (empty when the trees are equal)."""
    problems: list[str] = []
    for rel in sorted(set(expected) | set(actual)):
        name = os.fsdecode(rel)
        if rel not in actual:
            problems.append(f"missing: {name} ({expected[rel]['type']})")
        elif rel not in expected:
            problems.append(f"unexpected: {name} ({actual[rel]['type']})")
        else:
            a, b = expected[rel], actual[rel]
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    problems.append(f"{name}: {key} expected {a.get(key)!r}, got {b.get(key)!r}")
        if len(problems) >= limit:
            problems.append("...")
            break
    return problems
