"""The C library through ctypes, loaded once for every module that needs a call Python lacks.

mount(2) and umount2(2) for snapshots, fallocate(2) for the span cache's holes, syncfs(2)
for layers unpacked in the background, malloc_trim(3) and mallopt(3) for the service's
memory, prctl(2) for the names its threads show the system. Each wrapper of a call that can
fail raises OSError with the call's errno, so callers handle failures as they do for `os`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading


@functools.cache
def _libc() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libc.so.6", use_errno=True)   # glibc's name: no `ldconfig -p` child to find it
    except OSError:
        lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    lib.prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return lib


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), what)


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    """mount(2); OSError on failure."""
    _check(_libc().mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                         flags, data.encode() if data else None), target)


def umount2(target: str, flags: int) -> None:
    """umount2(2); OSError on failure."""
    _check(_libc().umount2(target.encode(), flags), target)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); OSError on failure."""
    _check(_libc().fallocate(fd, mode, offset, length), f"fd {fd}")


def syncfs(path: str) -> None:
    """syncfs(2) of the filesystem holding `path` (os.sync flushes every filesystem); OSError on failure."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check(_libc().syncfs(fd), path)
    finally:
        os.close(fd)


def malloc_trim() -> None:
    """Give the heap's free memory back to the OS (glibc only; elsewhere nothing happens)."""
    try:
        _libc().malloc_trim(0)
    except AttributeError:
        pass


def mallopt(param: int, value: int) -> None:
    """Set a glibc allocator parameter (elsewhere nothing happens)."""
    try:
        _libc().mallopt(param, value)
    except AttributeError:
        pass


_PR_SET_NAME = 15


def name_this_thread() -> None:
    """Give the calling thread its Python name (without the `lazyoci-` prefix, cut to the kernel's
    15 bytes) where `top -H`, `ps -L`, perf and /proc/PID/task/TID/comm show it. Python 3.11
    names only its own Thread object, and a thread shows the name of the one that started it:
    in the service, trio's worker thread renamed after the request it ran ("mount from ...")."""
    name = threading.current_thread().name.removeprefix("lazyoci-").encode()[:15]
    try:
        _libc().prctl(_PR_SET_NAME, name, 0, 0, 0)
    except AttributeError:
        pass
