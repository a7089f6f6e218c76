"""`image mount` / `image unmount`: an image's root filesystem, read-only, at a directory.

The mount is a "view" snapshot of the chosen snapshotter; which view belongs to
which directory is kept in the database so that `unmount` (another process)
can remove it. Unlike a container's root filesystem, which only its container
sees, this directory is there for users to browse: it is mounted nosuid and
nodev, so an image's setuid binaries and device nodes give no one anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from lazyoci.config import Config
from lazyoci.errors import ContainerError, ImageNotFoundError, StoreError
from lazyoci.images.service import ImageService
from lazyoci.oci.digest import Digest
from lazyoci.oci.platform import Platform
from lazyoci.snapshot.base import Mount
from lazyoci.snapshot.mount_syscall import is_mountpoint, mount_all, unmount
from lazyoci.snapshot.snapshotters import get_snapshotter
from lazyoci.store.db import Database
from lazyoci.store.layout import DataRoot

_DDL = """
CREATE TABLE IF NOT EXISTS image_mounts (
    dir TEXT PRIMARY KEY,            -- absolute mount point
    snapshotter TEXT NOT NULL,
    snapshot_key TEXT NOT NULL,
    image TEXT NOT NULL
);
"""


def _db(root: DataRoot) -> Database:
    db = Database(root.db_path)
    db.ensure_schema("image_mounts", _DDL)
    return db


def mount_image(root: DataRoot, config: Config, images: ImageService, ref: str, snapshotter: str,
                directory: Path, platform: Platform | None = None, progress=None,
                index_digest: str | None = None, log: Callable[[str], None] | None = None) -> None:
    """Mount the image `ref` read-only at directory (pulled first if it is not local; `log`
    receives the pull's INFO lines)."""
    if not directory.is_dir():
        raise ContainerError(f"mount point {directory} is not a directory")
    if is_mountpoint(directory):
        raise ContainerError(f"{directory} is already a mount point")
    snap = get_snapshotter(snapshotter, root, config, images.client)
    if index_digest is not None:        # an explicit index is checked by a pull, even of a local image
        Digest.parse(index_digest)      # malformed: one error before anything
        image = snap.pull(images, ref, platform, progress=progress, index_digest=index_digest, log=log)
    else:
        try:
            image = images.get(ref, platform)
        except ImageNotFoundError:
            image = snap.pull(images, ref, platform, progress=progress, log=log)
    top = snap.unpack_image(images, image)
    key = "mount-" + hashlib.sha256(str(directory).encode()).hexdigest()[:32]
    db = _db(root)
    mounts = [Mount(m.type, m.source, m.options + ("nosuid", "nodev"))
              for m in snap.view(key, top, {"lazyoci/mount": str(directory)})]
    try:
        mount_all(mounts, directory)
        with db.transaction() as c:
            c.execute("INSERT OR REPLACE INTO image_mounts VALUES (?, ?, ?, ?)",
                      (str(directory), snap.name, key, image.name or ref))
    except BaseException:
        unmount(directory)
        snap.remove(key)
        raise


def unmount_image(root: DataRoot, config: Config, directory: Path) -> None:
    db = _db(root)
    with db.reading() as c:
        row = c.execute("SELECT * FROM image_mounts WHERE dir=?", (str(directory),)).fetchone()
    if row is None:
        raise ContainerError(f"{directory} is not an image mounted by lazyoci")
    unmount(directory, lazy_fallback=False)
    snap = get_snapshotter(row["snapshotter"], root, config)
    try:
        snap.remove(row["snapshot_key"])
    except StoreError:
        pass
    with db.transaction() as c:
        c.execute("DELETE FROM image_mounts WHERE dir=?", (str(directory),))
