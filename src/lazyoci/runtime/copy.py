"""`cp` in and out of a container's root filesystem, never outside it.

A path in the container is resolved by the kernel with openat2(RESOLVE_IN_ROOT):
symlinks (absolute or with `..`) resolve as the container would see them, so a
link in the image that points at the host's `/etc` lands on the container's
`/etc`, and a link swapped in by a running container while we copy cannot move
us out either. Below that point the copy works on file descriptors, opening each
name with O_NOFOLLOW: a symlink inside a copied tree is copied as a symlink.
As docker does, files copied into a container belong to its root user, and the
host side of a copy is the user's choice (its symlinks are followed).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lazyoci.errors import ContainerError

_SYS_OPENAT2 = 437              # the same number on every Linux architecture
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_in_root(root_fd: int, path: str, flags: int) -> int:
    """Open `path` as seen from inside the directory `root_fd` (the kernel keeps it there)."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root_fd), os.fsencode(path or "."),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        if e == errno.ENOSYS:
            raise ContainerError("cp needs openat2 (Linux 5.6 or later)")
        raise OSError(e, os.strerror(e), path)
    return fd


@contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _split(path: str) -> tuple[str, str]:
    """(parent, last name) of a container path; the root itself has no name."""
    stripped = path.rstrip("/")
    parent, _, name = stripped.rpartition("/")
    if name in ("", ".", ".."):
        return path, ""
    return parent or "/", name


def _error(e: OSError, what: str) -> ContainerError:
    return ContainerError(f"{what}: {e.strerror or e}")


def copy_out(rootfs: Path, src: str, dest: Path) -> None:
    """Copy `src` of the container (a file, directory, symlink ...) to `dest` on the host.

    As `cp -a`: into `dest` if it is an existing directory, else as `dest`."""
    if not dest.is_dir() and not dest.parent.is_dir():
        raise ContainerError(f"no such directory on the host: {dest.parent}")
    parent, name = _split(src)
    try:
        with _fd(os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY)) as root_fd:
            with _fd(open_in_root(root_fd, parent, os.O_PATH | os.O_DIRECTORY)) as parent_fd:
                if name:
                    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                else:
                    st = os.stat(parent_fd)
                    name = "."
                if name == ".":          # the whole root filesystem: its content into dest
                    with _fd(os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent_fd)) as dir_fd:
                        _copy_dir_out(dir_fd, dest, st)
                else:
                    _copy_entry_out(parent_fd, name, st, dest / name if dest.is_dir() else dest)
    except FileNotFoundError:
        raise ContainerError(f"no such file or directory in the container: {src}") from None
    except NotADirectoryError:
        raise ContainerError(f"not a directory in the container: {parent}") from None
    except OSError as e:
        raise _error(e, f"cannot copy {src} out of the container") from None


def _copy_entry_out(dir_fd: int, name: str, st: os.stat_result, target: Path) -> None:
    if stat.S_ISDIR(st.st_mode):
        with _fd(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)) as sub:
            _copy_dir_out(sub, target, st)
    elif stat.S_ISREG(st.st_mode):
        with _fd(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)) as src_fd:
            if target.is_symlink() or target.exists():
                target.unlink()
            with _fd(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)) as dst_fd:
                _copy_bytes(src_fd, dst_fd)
                os.fchown(dst_fd, st.st_uid, st.st_gid)     # before the mode: chown clears setuid
                os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    elif stat.S_ISLNK(st.st_mode):
        if target.is_symlink() or target.exists():
            target.unlink()
        os.symlink(os.readlink(name, dir_fd=dir_fd), target)
        os.lchown(target, st.st_uid, st.st_gid)
    else:   # fifo, character or block device, socket: the node itself
        if target.is_symlink() or target.exists():
            target.unlink()
        os.mknod(target, st.st_mode, st.st_rdev)
        os.lchown(target, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_dir_out(dir_fd: int, target: Path, st: os.stat_result) -> None:
    target.mkdir(mode=0o700, exist_ok=True)
    for entry in os.scandir(dir_fd):
        child = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
        _copy_entry_out(dir_fd, entry.name, child, target / entry.name)
    os.chown(target, st.st_uid, st.st_gid)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def copy_in(rootfs: Path, src: Path, dest: str) -> None:
    """Copy `src` of the host to `dest` in the container, owned by the container's root.

    Into `dest` if it is a directory there (followed inside the container), else as `dest`,
    whose directory must exist; an existing symlink at `dest` is replaced, not followed."""
    try:
        src_st = os.stat(src)
    except OSError as e:
        raise _error(e, f"cannot copy {src}") from None
    try:
        with _fd(os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY)) as root_fd:
            try:
                dir_fd = open_in_root(root_fd, dest, os.O_RDONLY | os.O_DIRECTORY)
                name = src.name or "."
            except (FileNotFoundError, NotADirectoryError):
                parent, name = _split(dest)
                try:
                    dir_fd = open_in_root(root_fd, parent, os.O_RDONLY | os.O_DIRECTORY)
                except (FileNotFoundError, NotADirectoryError):
                    raise ContainerError(f"no such directory in the container: {parent}") from None
            with _fd(dir_fd):
                if name == ".":
                    _copy_tree_in(src, dir_fd)
                else:
                    _copy_entry_in(src, src_st, dir_fd, name)
    except OSError as e:
        raise _error(e, f"cannot copy {src} into the container at {dest}") from None


def _copy_entry_in(src: Path, st: os.stat_result, dir_fd: int, name: str) -> None:
    try:
        existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        existing = None
    if stat.S_ISDIR(st.st_mode):
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            os.unlink(name, dir_fd=dir_fd)
            existing = None
        if existing is None:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        with _fd(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)) as sub:
            _copy_tree_in(src, sub)
            os.fchown(sub, 0, 0)
            os.fchmod(sub, stat.S_IMODE(st.st_mode))
        return
    if existing is not None:
        if stat.S_ISDIR(existing.st_mode):
            raise ContainerError(f"cannot overwrite the directory {name} in the container with a file")
        os.unlink(name, dir_fd=dir_fd)
    if stat.S_ISREG(st.st_mode):
        with _fd(os.open(src, os.O_RDONLY)) as src_fd, \
                _fd(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                            dir_fd=dir_fd)) as dst_fd:
            _copy_bytes(src_fd, dst_fd)
            os.fchown(dst_fd, 0, 0)
            os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), name, dir_fd=dir_fd)
        os.chown(name, 0, 0, dir_fd=dir_fd, follow_symlinks=False)
    else:
        os.mknod(name, st.st_mode, st.st_rdev, dir_fd=dir_fd)
        os.chown(name, 0, 0, dir_fd=dir_fd, follow_symlinks=False)


def _copy_tree_in(src: Path, dir_fd: int) -> None:
    for entry in os.scandir(src):
        _copy_entry_in(Path(entry.path), os.stat(entry.path, follow_symlinks=False), dir_fd, entry.name)


def _copy_bytes(src_fd: int, dst_fd: int) -> None:
    while data := os.read(src_fd, _CHUNK):
        view = memoryview(data)
        while view:
            view = view[os.write(dst_fd, view):]
