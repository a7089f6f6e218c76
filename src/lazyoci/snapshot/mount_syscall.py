"""Perform and undo snapshot mounts with mount(2) (through libc; no helper process).

Overlay options are limited to one page, so many-layer stacks use lowerdir paths
relative to a common directory: the mount is then done by `mount(8)` run in that
directory (a process of its own, so our cwd never changes under other threads).
The options `nosuid`, `nodev` and `noexec` are mount flags, as for mount(8).
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from lazyoci import libc
from lazyoci.errors import ContainerError
from lazyoci.snapshot.base import Mount

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2
_PAGE = 4000
_FLAG_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    try:
        libc.mount(source, target, fstype, flags, data)
    except OSError as e:
        raise ContainerError(f"mount {fstype or 'bind'} on {target} failed: {e.strerror}") from None


def mount_all(mounts: list[Mount], target: Path) -> None:
    """Mount `mounts` (in order) on target."""
    for m in mounts:
        flags = 0
        for o in m.options:
            flags |= _FLAG_OPTIONS.get(o, 0)
        if m.type == "bind":
            _mount(m.source, str(target), None, MS_BIND | (MS_REC if "rbind" in m.options else 0), None)
            if "ro" in m.options or flags:     # a bind mount takes its flags from a remount
                flags |= MS_RDONLY if "ro" in m.options else 0
                _mount("none", str(target), None, MS_REMOUNT | MS_BIND | flags, None)
        elif m.type == "overlay":
            data = ",".join(o for o in m.options if o not in _FLAG_OPTIONS)
            if len(data) < _PAGE:
                _mount(m.source, str(target), "overlay", flags, data)
            else:
                _mount_relative(m, target)
        else:
            raise ContainerError(f"unsupported mount type {m.type!r}")


def _mount_relative(m: Mount, target: Path) -> None:
    """Shorten lowerdir paths to be relative to their common parent and mount from there."""
    opts = list(m.options)
    lower_i = next(i for i, o in enumerate(opts) if o.startswith("lowerdir="))
    lowers = opts[lower_i][len("lowerdir="):].split(":")
    base = os.path.commonpath(lowers)
    opts[lower_i] = "lowerdir=" + ":".join(os.path.relpath(p, base) for p in lowers)
    data = ",".join(opts)
    if len(data) >= _PAGE:
        raise ContainerError(f"too many layers to mount ({len(lowers)})")
    r = subprocess.run(["mount", "-t", "overlay", m.source, "-o", data, str(target)],
                       cwd=base, capture_output=True, text=True)
    if r.returncode != 0:
        raise ContainerError(f"mount overlay on {target} failed: {r.stderr.strip()}")


def unmount(target: Path, lazy_fallback: bool = True) -> None:
    """Unmount target; EINVAL (not mounted) is fine. Busy mounts are detached if allowed."""
    try:
        libc.umount2(str(target), 0)
        return
    except OSError as e:
        err = e.errno or errno.EIO
    if err in (errno.EINVAL, errno.ENOENT):
        return
    if err == errno.EBUSY and lazy_fallback:
        try:
            libc.umount2(str(target), MNT_DETACH)
            return
        except OSError as e:
            err = e.errno or errno.EIO
    raise ContainerError(f"cannot unmount {target}: {os.strerror(err)}")


def is_mountpoint(path: Path) -> bool:
    p = str(Path(path).absolute())
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == p for line in f)
    except OSError:
        return False
