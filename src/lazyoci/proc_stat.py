"""What /proc/<pid>/stat says of a process, read in one place.

Liveness checks of other processes (a lease's pull, a service getting ready, a temporary
blob's writer, a container's monitor) must not take a zombie for a running process: it has ended, and its parent has not
reaped it yet, which an init that reaps late (a container's) leaves for a while.
"""

from __future__ import annotations

import os

__all__ = ["running", "stat_fields"]


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, its state first (field 3 of
    proc(5) is index 0); None if the process is gone or the file cannot be read."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data.rpartition(b")")[2].decode("ascii", "replace").split()


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (nor dead). Where /proc cannot be read,
    that the process exists is the answer (os.kill's, which also sees other users' processes)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = stat_fields(pid)
    return fields is None or fields[0] not in ("Z", "X")
