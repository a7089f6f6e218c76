"""Where the service keeps its files, and unix sockets with long paths.

    <root>/service/lazyoci.sock   control socket (0600, directory 0700: root only)
    <root>/service/lazyoci.pid    pid of the running daemon (0600)
    <root>/service/lazyoci.log    the daemon's log (0600)
    <root>/service/lifecycle.lock locked by a `service stop` or `service restart` under way (0600)
    <root>/service/mnt            the FUSE mount (a directory per lazy layer and zTOC)
    <root>/service/mnt-plain      the same session's plain mount: the layers with no xattr and no
                                  opaque directory, where the kernel asks no xattr at all

Only root reaches the FUSE mount: the directory above it is closed, and the mount
itself admits its owner alone (no allow_other; the overlays over it read their
lower layers with the credentials of root, who mounted them).
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from lazyoci.store.layout import DataRoot
from lazyoci.store.modes import PRIVATE_DIR_MODE, private_dir

_SUN_PATH_MAX = 100     # sun_path is 108 bytes; keep a margin


def layer_view_name(layer_digest: str, index_digest: str) -> str:
    """The FUSE directory of a layer served through one index: `<layer hex>-<16 hex of the index>`,
    so two indexes of one layer never share a view."""
    return f"{layer_digest.split(':', 1)[-1]}-{index_digest.split(':', 1)[-1][:16]}"


@dataclass(frozen=True)
class ServicePaths:
    root: DataRoot

    @property
    def dir(self) -> Path:
        return self.root.service

    @property
    def socket(self) -> Path:
        return self.dir / "lazyoci.sock"

    @property
    def pid_file(self) -> Path:
        return self.dir / "lazyoci.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "lazyoci.log"

    @property
    def lifecycle_lock(self) -> Path:
        return self.dir / "lifecycle.lock"

    @property
    def mountpoint(self) -> Path:
        return self.dir / "mnt"

    @property
    def records_reads(self) -> Path:
        """Present in a data root whose service records every read (`soci optimize`'s): it then
        hands no layer's READs to the session holder, which would answer them unseen, and unpacks
        no layer for containers, which would read it without a FUSE request."""
        return self.dir / "records-reads"

    @property
    def plain_mountpoint(self) -> Path:
        return self.dir / "mnt-plain"

    @property
    def mountpoints(self) -> tuple[Path, Path]:
        return self.mountpoint, self.plain_mountpoint

    def view_dir(self, layer_digest: str, index_digest: str) -> Path:
        """The FUSE directory of a lazy layer seen through an index, served or not (every served
        view is there)."""
        return self.mountpoint / layer_view_name(layer_digest, index_digest)

    def lower_dir(self, layer_digest: str, index_digest: str) -> Path:
        """What an overlay's lowerdir for the view is: its directory in the plain mount if the view
        is served there, else `view_dir`. A stat in the mount: never from the thread that serves it."""
        plain = self.plain_mountpoint / layer_view_name(layer_digest, index_digest)
        return plain if plain.is_dir() else self.view_dir(layer_digest, index_digest)

    def ensure(self) -> None:
        self.root.ensure()
        private_dir(self.dir)
        try:
            os.mkdir(self.mountpoint, PRIVATE_DIR_MODE)
        except FileExistsError:
            pass     # also a dead FUSE mount of a killed service, which the daemon detaches


def socket_address(path: Path) -> tuple[str, int | None]:
    """An AF_UNIX address for `path` even when it is longer than sun_path allows.

    Long data roots (pytest's tmp dirs) go through /proc/self/fd/<dirfd>/<name>;
    the caller must close the returned directory fd after bind/connect.
    """
    text = os.fspath(path)
    if len(text.encode()) <= _SUN_PATH_MAX:
        return text, None
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{dfd}/{path.name}", dfd


def connect(path: Path, timeout: float) -> socket.socket:
    """A connected blocking client socket to the control socket at `path`."""
    addr, dfd = socket_address(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    finally:
        if dfd is not None:
            os.close(dfd)
    return sock


def pid_file_locked(pid_file: Path) -> bool:
    """True while a process holds the lock of its pid file (a pid alone may have been reused;
    the lock goes with the process)."""
    try:
        fd = os.open(pid_file, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
