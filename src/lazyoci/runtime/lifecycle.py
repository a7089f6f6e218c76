"""`start`, `restart`, `kill`, `wait` and `top` of existing containers.

An exited container keeps its bundle (config.json, generated /etc files, log) and
its writable snapshot, not its rootfs mount. `start` mounts the snapshot again and
hands the bundle to a new detached monitor, as docker starts a stopped container
in the background; the log goes on after the previous run's output.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lazyoci.errors import ConfigError, ContainerError
from lazyoci.runtime.containers import ContainerRecord
from lazyoci.runtime.run import STOP_TIMEOUT, ContainerManager, RunOptions
from lazyoci.runtime.runc import Runtime
from lazyoci.snapshot.mount_syscall import is_mountpoint, mount_all, unmount
from lazyoci.snapshot.snapshotters import get_snapshotter
from lazyoci.store.modes import PRIVATE_FILE_MODE

_MAX_SIGNAL = 64   # SIGRTMAX on Linux


def parse_signal(text: str) -> int:
    """A signal by docker's rules: a number, or a name with or without SIG, in any case."""
    if text.isascii() and text.isdigit():
        number = int(text)
        if 1 <= number <= _MAX_SIGNAL:
            return number
        raise ConfigError(f"invalid signal: {text}")
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ConfigError(f"invalid signal: {text}") from None


@contextmanager
def _rootfs_lock(cdir: Path) -> Iterator[None]:
    """Held while `start` or `cp` mounts an exited container's rootfs, so they take turns."""
    fd = os.open(cdir / "rootfs.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def container_rootfs(mgr: ContainerManager, name_or_id: str) -> Iterator[Path]:
    """The container's root filesystem, mounted for as long as the block runs.

    A running container's is its own mount; an exited container's snapshot is mounted
    at the same place and unmounted afterwards (`start` waits meanwhile)."""
    rec = mgr.store.get(name_or_id)
    cdir = mgr.store.dir(rec.id)
    rootfs = cdir / "rootfs"
    if rec.status == "running":
        yield rootfs
        return
    with _rootfs_lock(cdir):
        if mgr.store.get(rec.id).status == "running" or is_mountpoint(rootfs):
            yield rootfs
            return
        snap = get_snapshotter(rec.snapshotter, mgr.root, mgr.config)
        mount_all(snap.mounts(rec.snapshot_key), rootfs)
        try:
            yield rootfs
        finally:
            unmount(rootfs)


def start(mgr: ContainerManager, name_or_id: str) -> ContainerRecord:
    """Start an exited container again, in the background; a running one is left as it is."""
    rec = mgr.store.get(name_or_id)
    if rec.status == "running":
        return rec
    cdir = mgr.store.dir(rec.id)
    _check_startable(mgr, rec)
    runtime = Runtime.find(rec.runtime, mgr.root.path)
    with _rootfs_lock(cdir):
        if not mgr.store.set_restartable(rec.id):
            raise ContainerError(f"container {rec.name} is being started by another command")
        rootfs = cdir / "rootfs"
        try:
            runtime.delete(rec.id)                 # a stale runtime record would refuse the id
            for stale in ("pid", "exit.json"):     # the wait for the new start looks for these
                (cdir / stale).unlink(missing_ok=True)
            if not is_mountpoint(rootfs):
                snap = get_snapshotter(rec.snapshotter, mgr.root, mgr.config)
                mount_all(snap.mounts(rec.snapshot_key), rootfs)
        except BaseException:
            unmount(rootfs)
            mgr.store.set_exited(rec.id, rec.exit_code)
            raise
    # The lock is not held by the monitor: `cp` finds the rootfs mounted and leaves it so.
    mgr.start(rec, runtime, RunOptions(image=rec.image, detach=True, auto_remove=rec.auto_remove,
                                       runtime=rec.runtime, snapshotter=rec.snapshotter))
    return mgr.store.get(rec.id)


def _check_startable(mgr: ContainerManager, rec: ContainerRecord) -> None:
    """Refuse, before anything changes, a container that a background start cannot run."""
    try:
        spec = json.loads((mgr.store.dir(rec.id) / "config.json").read_text())
    except (OSError, ValueError):
        raise ContainerError(f"container {rec.name} has no runtime bundle left: remove it and run the image "
                             "again") from None
    if spec.get("process", {}).get("terminal"):
        raise ContainerError(f"container {rec.name} was run with -t: a container started in the background "
                             "gets no terminal here; run the image again")


def restart(mgr: ContainerManager, name_or_id: str, timeout: float = STOP_TIMEOUT) -> ContainerRecord:
    """Stop (the image's stop signal, then SIGKILL after `timeout`) and start again.

    A `--rm` container is removed by its monitor when it stops, so it is refused, running."""
    rec = mgr.store.get(name_or_id)
    if rec.auto_remove and rec.status == "running":
        raise ContainerError(f"container {rec.name} was run with --rm: stopping it would remove it, "
                             "so it cannot be restarted")
    _check_startable(mgr, rec)
    rec = mgr.stop(rec.id, timeout)
    return start(mgr, rec.id)


def kill(mgr: ContainerManager, name_or_id: str, signal_name: str = "KILL") -> ContainerRecord:
    """Send a signal to a running container's init process."""
    number = parse_signal(signal_name)
    rec = mgr.store.get(name_or_id)
    if rec.status != "running":
        raise ContainerError(f"cannot kill container {rec.name}: it is not running")
    if not Runtime.find(rec.runtime, mgr.root.path).kill(rec.id, str(number)):
        if mgr.store.get(rec.id).status != "running":
            raise ContainerError(f"cannot kill container {rec.name}: it is not running")
        raise ContainerError(f"cannot kill container {rec.name}: the runtime refused the signal")
    return rec


def wait(mgr: ContainerManager, name_or_id: str) -> int:
    """Block until the container is no longer running; its exit code (-1 if nobody recorded one)."""
    rec = mgr.store.get(name_or_id)
    while rec.status in ("running", "created"):
        _wait_for_process(rec.monitor_pid, 1.0)
        rec = mgr.store.get(rec.id)
    return -1 if rec.exit_code is None else rec.exit_code


def _wait_for_process(pid: int | None, timeout: float) -> None:
    """Return when `pid` exits or after `timeout` seconds, whichever is first (the caller checks)."""
    if pid is None:
        select.select([], [], [], timeout)
        return
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProcessTable:
    """`top`'s answer: the titles of `ps` and one row per process of the container."""

    titles: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def top(mgr: ContainerManager, name_or_id: str, ps_args: tuple[str, ...] = ()) -> ProcessTable:
    """The container's processes as `ps` shows them (default `ps -ef`), as docker top does."""
    rec = mgr.store.get(name_or_id)
    if rec.status != "running":
        raise ContainerError(f"container {rec.name} is not running")
    runtime = Runtime.find(rec.runtime, mgr.root.path)
    pids = runtime.pids(rec.id)
    try:
        r = subprocess.run(["ps", *(ps_args or ("-ef",))], capture_output=True, text=True)
    except OSError as e:
        raise ContainerError(f"cannot run ps: {e.strerror}") from None
    if r.returncode != 0:
        detail = (r.stderr.strip().splitlines() or ["failed"])[0]
        raise ContainerError(f"ps {' '.join(ps_args)}: {detail}")
    lines = r.stdout.splitlines()
    if not lines:
        raise ContainerError("ps printed nothing")
    titles = tuple(lines[0].split())
    if "PID" not in titles:
        raise ContainerError(f"ps {' '.join(ps_args)}: its output has no PID column")
    at = titles.index("PID")
    rows = []
    for line in lines[1:]:
        fields = line.split(None, len(titles) - 1)
        if len(fields) > at and fields[at].isdigit() and int(fields[at]) in pids:
            rows.append(tuple(fields))
    return ProcessTable(titles, tuple(rows))
