"""Where everything lives under the data root (see docs/ARCHITECTURE.md), closed to other users."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from lazyoci.errors import StoreError
from lazyoci.store.modes import ROOT_DIR_MODE, private_dir, tighten_file

DB_NAME = "lazyoci.db"
DB_FILES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal")
PRIVATE_DIRS = ("blobs", "tmp", "snapshots", "containers", "runtime", "soci", "service", "build")
CONFIG_DOCUMENT = "config-document.json"
OWN_ENTRIES = frozenset(DB_FILES + PRIVATE_DIRS + (CONFIG_DOCUMENT,))    # what lazyoci makes in the root


@dataclass(frozen=True)
class DataRoot:
    """The data root directory; every area derives its paths from here so they never drift."""

    path: Path

    @property
    def blobs(self) -> Path:
        """Content-addressed blobs live at ``blobs/<algorithm>/<hex>``."""
        return self.path / "blobs"

    @property
    def tmp(self) -> Path:
        """In-flight writes; on the same filesystem as `blobs` so that rename is atomic."""
        return self.path / "tmp"

    @property
    def db_path(self) -> Path:
        return self.path / DB_NAME

    @property
    def snapshots(self) -> Path:
        return self.path / "snapshots"

    @property
    def containers(self) -> Path:
        return self.path / "containers"

    @property
    def runtime(self) -> Path:
        """The OCI runtime's state, ``runtime/<runc|crun>``."""
        return self.path / "runtime"

    @property
    def soci(self) -> Path:
        return self.path / "soci"

    @property
    def service(self) -> Path:
        return self.path / "service"

    @property
    def config_document(self) -> Path:
        """The config file's parsed document, kept for the next command (lazyoci/config_documents.py)."""
        return self.path / CONFIG_DOCUMENT

    def ensure(self) -> "DataRoot":
        """Create the data root and its directories, or close those of an existing one (idempotent).

        Like docker's, the root is 0710 and every directory lazyoci makes in it 0700, the
        database 0600. An existing root is closed only if it holds nothing but lazyoci's own
        entries (an older lazyoci made it 0755): a directory that also holds other things
        (`--root /srv`, even `--root /tmp`) keeps its mode, since lazyoci never changes what
        it did not make. Each entry is closed on its own, so the protection never rests on
        the root's mode.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)   # outside the data root: usual modes
            try:
                os.mkdir(self.path, ROOT_DIR_MODE)
                os.chmod(self.path, ROOT_DIR_MODE)      # mkdir's mode went through the umask
            except FileExistsError:
                if not self.path.is_dir():
                    raise StoreError(f"data root {self.path} is not a directory") from None
                mode = stat.S_IMODE(os.stat(self.path).st_mode)     # a symlinked root: its target
                if mode & ~ROOT_DIR_MODE and set(os.listdir(self.path)) <= OWN_ENTRIES:
                    os.chmod(self.path, mode & ROOT_DIR_MODE)
        except OSError as e:
            raise StoreError(f"cannot create data root {self.path}: {e.strerror or e}") from None
        for name in PRIVATE_DIRS:
            private_dir(self.path / name)
        private_dir(self.blobs / "sha256")
        for name in DB_FILES:
            tighten_file(self.path / name)
        return self
