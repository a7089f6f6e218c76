"""What a test can leave behind under its directories: mounts (overlays, the service's FUSE
mount, image mounts) and processes (the service, its FUSE session holder, containers).

conftest.py fails a test that leaves any (and clears them, so the tests after it are not hit)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are octal escapes there."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts_under(path: Path) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount at or below `path`, deepest last."""
    prefix = os.fspath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            target = _unescape(fields[4])
            if target == prefix or target.startswith(prefix + "/"):
                found.append((target, fields[fields.index("-") + 1]))
    return found


def _ancestors() -> set[int]:
    """This process and those above it (pytest's own command line may name the directory)."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def processes_under(path: Path) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose command line names `path` or whose root lies in it."""
    prefix, mine, found = os.fspath(path), _ancestors(), []
    named = re.compile(re.escape(prefix) + r"(/|\s|$)")
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            root = os.readlink(f"/proc/{entry}/root")
        except OSError:
            continue
        if cmd and (named.search(cmd) or root.startswith(prefix + "/")):
            found.append((int(entry), cmd))
    return found


def left_behind(path: Path) -> list[str]:
    """The mounts and processes below `path`, one line each."""
    return ([f"{fstype} mount {target}" for target, fstype in mounts_under(path)] +
            [f"process {pid}: {cmd}" for pid, cmd in processes_under(path)])


def settle(path: Path, seconds: float = 10.0) -> list[str]:
    """What is left below `path` once processes that are on their way out had the time to go."""
    deadline = time.monotonic() + seconds
    while (left := left_behind(path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def clear(path: Path) -> None:
    """Kill the processes and detach the mounts below `path` (a holder killed may have started
    a service again meanwhile: repeated until nothing is left)."""
    for _ in range(5):
        for pid, _cmd in processes_under(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for target, _fstype in reversed(mounts_under(path)):
            subprocess.run(["umount", "-l", target], capture_output=True)
        if not settle(path, 2.0):
            return
