"""Progress events: the library reports, the CLI draws (cli/progress.py).

Keys are Finch's row names: the reference for resolve, ``manifest-sha256:<hex>``,
``index-sha256:<hex>``, ``config-sha256:<hex>``, ``layer-sha256:<hex>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["resolve", "manifest", "config", "layer", "index"]
Status = Literal["resolving", "resolved", "waiting", "downloading", "uploading", "done", "exists", "mounted"]

# Statuses after which a row does not change any more.
FINAL_STATUSES = frozenset({"resolved", "done", "exists", "mounted"})


@dataclass(frozen=True)
class ProgressEvent:
    key: str
    kind: Kind
    status: Status
    current: int = 0
    total: int | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


ProgressSink = Callable[[ProgressEvent], None]


def row_key(kind: str, digest: str) -> str:
    """Finch's row name for a blob: ``layer-sha256:<hex>``."""
    return f"{kind}-{digest}"


def no_progress(event: ProgressEvent) -> None:
    """The sink used when the caller passes none."""
