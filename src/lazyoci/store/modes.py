"""The modes of what lazyoci keeps: nothing under the data root is open to other local users.

A container's root filesystem, its config (`-e PASSWORD=...`), its logs, the
database, the span cache and the lazy mount all live under the data root, so
its directories are closed as docker closes its own: the root 0710, every
directory lazyoci makes in it 0700, every file with a secret 0600. A non-root
user then cannot reach a container's setuid binaries even though the container's
mount keeps them working, nor read what a container was given.

Modes are set explicitly (os.open and mkdir with a mode, fchmod after), never
left to the umask: the CLI and the service may run under any umask, and a loose
one must not open a secret, nor a strict one close a file a container must read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lazyoci.errors import StoreError

ROOT_DIR_MODE = 0o710       # the data root (docker's): its owner's group may pass, no one may list
PRIVATE_DIR_MODE = 0o700    # every directory lazyoci makes under the data root
PRIVATE_FILE_MODE = 0o600   # the database, configs, logs, pid and exit files
SHARED_FILE_MODE = 0o644    # files a container's own (possibly non-root) user must read


def _error(e: OSError, path: Path) -> StoreError:
    return StoreError(f"cannot secure {path}: {e.strerror or e}")


def set_mode(path: Path, mode: int) -> None:
    """Give `path`, which must be ours and not a symlink, exactly `mode` (if it has another one).

    In a data root shared with other things (`--root /tmp`) someone else may have made the
    entry first: using it would hand them what lazyoci keeps there."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise StoreError(f"cannot secure {path}: it is a symbolic link")
        if st.st_uid != os.geteuid():
            raise StoreError(f"cannot secure {path}: it belongs to uid {st.st_uid}, not to us")
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
    except OSError as e:
        raise _error(e, path) from None


def private_dir(path: Path, mode: int = PRIVATE_DIR_MODE) -> Path:
    """Create the directory `path` (its parent must exist) or close an existing one: `mode` exactly."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except OSError as e:
        raise _error(e, path) from None
    set_mode(path, mode)     # mkdir's mode went through the umask; an old directory had another
    return path


def tighten_file(path: Path, mode: int = PRIVATE_FILE_MODE) -> None:
    """Close a file that may exist (a data root of an older lazyoci made it 0644)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise _error(e, path) from None
    set_mode(path, mode)


def write_file(path: Path, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Replace `path` atomically with `data`, with `mode` from the first byte on."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)      # the umask may have taken bits that a shared file needs
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None


def open_private_log(path: Path) -> int:
    """An fd appending to the log at `path`, created 0600 (an existing one is closed too)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                     PRIVATE_FILE_MODE)
        os.fchmod(fd, PRIVATE_FILE_MODE)
    except OSError as e:
        raise StoreError(f"cannot open log {path}: {e.strerror or e}") from None
    return fd
