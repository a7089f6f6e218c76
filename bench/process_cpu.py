"""CPU seconds of the processes a bench measures: a live process's so far, from /proc."""

from __future__ import annotations

import os
from pathlib import Path

_CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a live process has spent so far (0 if there is none or it is gone)."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK
