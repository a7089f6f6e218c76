"""Where everything lives under the data root (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
        return self.path / "lazyoci.db"

    @property
    def snapshots(self) -> Path:
        return self.path / "snapshots"

    @property
    def containers(self) -> Path:
        return self.path / "containers"

    @property
    def soci(self) -> Path:
        return self.path / "soci"

    @property
    def service(self) -> Path:
        return self.path / "service"

    def ensure(self) -> "DataRoot":
        """Create the root and the directories the store needs (idempotent)."""
        for d in (self.path, self.blobs / "sha256", self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        return self
