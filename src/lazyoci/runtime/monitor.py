"""The per-container monitor: a forked process that runs the runtime and records the exit status.

`runc run` (foreground mode) waits for the container and exits with its status
(128+N for a signal). The monitor is its parent: it records that status in
`exit.json` and the database, and for a detached `--rm` container cleans up.
A detached monitor double-forks into its own session, so it outlives the
`lazyoci run -d` that started it; the container's output goes through it to the
log file, which notes when each line arrived (runtime/logfile.py).
Forking (instead of starting a new interpreter) keeps container start fast.

With a restart policy (`--restart on-failure[:N]`, detached only) the monitor runs
the runtime again after a nonzero exit, with docker's doubling delay, unless the
container was stopped by `stop` or `rm -f` (the mark `STOPPED_MARK` in its directory).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lazyoci.errors import LazyociError
from lazyoci.runtime.containers import ContainerStore, process_start, write_exit_file
from lazyoci.runtime.logfile import LogWriter
from lazyoci.runtime.runc import Runtime
from lazyoci.snapshot.mount_syscall import unmount
from lazyoci.store.modes import open_private_log

STOPPED_MARK = "stopped"         # written by stop / rm -f: the container is not restarted
RESTART_DELAY = 0.1              # seconds before the first restart, doubled for each one after



@dataclass(frozen=True)
class MonitorSpec:
    container_id: str
    bundle: Path
    runtime: Runtime
    detach: bool
    interactive: bool
    tty: bool
    log_path: Path
    pid_file: Path
    exit_file: Path
    restart_max: int | None = None   # None: never restart; 0: restart after every failure; N: at most N times


def spawn_monitor(spec: MonitorSpec, store: ContainerStore, on_exit) -> tuple[int, int | None]:
    """Fork the monitor. Returns (monitor pid, pid to wait for: the direct child, or None if detached).

    `on_exit(code)` runs in the monitor after the status is recorded (detached --rm cleanup)."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked process
        code = 0
        try:
            os.close(r)
            _become_monitor(spec, w)
            code = _run_runtime(spec, store)
            on_exit(code)
        except BaseException:
            code = 1
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    if spec.detach:
        os.waitpid(child, 0)  # the intermediate process exits at once
    pid = int(data.decode() or 0)
    return pid, None if spec.detach else child


def _become_monitor(spec: MonitorSpec, report_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is handled by `lazyoci run` (it stops the container)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if spec.detach:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        log = open_private_log(spec.log_path)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(devnull)
        os.close(log)
        os.chdir("/")
    else:
        if not spec.interactive and not spec.tty:
            os.setpgid(0, 0)   # out of the terminal's process group: Ctrl-C reaches only lazyoci
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
    os.write(report_fd, str(os.getpid()).encode())
    os.close(report_fd)


def _run_teed(cmd: list[str], spec: MonitorSpec) -> int:
    """The container's output goes to its log (with the time of each line) and, in the
    foreground, also where ours goes (so `logs` works for both)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen(cmd, stdout=out_w, stderr=err_w, close_fds=True)
    finally:
        os.close(out_w)
        os.close(err_w)
    log = LogWriter(spec.log_path)
    try:
        # When our stdout reader goes away (`| head`), end the container as SIGPIPE would end a
        # process in a pipeline: its init (PID 1 of its namespace) is immune to SIGPIPE itself.
        def reader_gone() -> None:
            spec.runtime.kill(spec.container_id, "KILL")

        streams = ((out_r, 1, reader_gone), (err_r, 2, None))
        threads = [threading.Thread(target=_tee, args=(r, None if spec.detach else fd, log, gone), daemon=True)
                   for r, fd, gone in streams]
        for t in threads:
            t.start()
        code = proc.wait()
        for t in threads:
            t.join()
    finally:
        log.close()
    return code


def _tee(src: int, dst: int | None, log: LogWriter, on_broken) -> None:
    """Copy a container's stream to its log and, unless `dst` is None, to our terminal/pipe.

    If our side is closed (`| head`), the container's pipe is closed too (EPIPE for it)
    and `on_broken` runs."""
    while True:
        try:
            data = os.read(src, 65536)
        except OSError:
            break
        if not data:
            break
        log.write(data)
        if dst is None:
            continue
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view):]
        except OSError:
            if on_broken is not None:
                on_broken()
            break
    os.close(src)


def _run_runtime(spec: MonitorSpec, store: ContainerStore) -> int:
    me = os.getpid()
    store.set_running(spec.container_id, me, process_start(me))
    restarts = 0
    while True:
        code = _run_once(spec)
        if not _restart_wanted(spec, code, restarts):
            break
        restarts += 1
        if not _wait_before_restart(spec, RESTART_DELAY * 2 ** min(restarts - 1, 9)):
            break
        spec.runtime.delete(spec.container_id)      # the exited container's runtime state
        spec.pid_file.unlink(missing_ok=True)
    write_exit_file(spec.exit_file, code)
    store.set_exited(spec.container_id, code)
    # An exited container keeps its writable layer (for `rm`), not its mount.
    try:
        unmount(spec.bundle / "rootfs")
    except LazyociError:
        pass
    return code


def _restart_wanted(spec: MonitorSpec, code: int, restarts: int) -> bool:
    if spec.restart_max is None or code == 0 or (spec.bundle / STOPPED_MARK).exists():
        return False
    return spec.restart_max == 0 or restarts < spec.restart_max


def _wait_before_restart(spec: MonitorSpec, delay: float) -> bool:
    """Sleep `delay` seconds; False as soon as `stop` or `rm -f` marks the container."""
    deadline = time.monotonic() + delay
    while True:
        if (spec.bundle / STOPPED_MARK).exists():
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(left, 0.05))


def _run_once(spec: MonitorSpec) -> int:
    """One run of the container by the runtime: its exit status (128+N for signal N)."""
    cmd = spec.runtime.run_cmd(spec.container_id, spec.bundle, spec.pid_file)
    try:
        if spec.tty:    # the runtime's pty: not logged
            code = subprocess.Popen(cmd, close_fds=True).wait()
        else:
            code = _run_teed(cmd, spec)
    except OSError:
        code = 127
    return 128 - code if code < 0 else code
