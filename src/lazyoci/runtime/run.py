"""`run`, `stop`, `rm`, `logs`: containers from images, through a snapshotter and runc.

run = ensure the image (pull policy) -> the snapshotter's committed layers ->
an active snapshot mounted at <container>/rootfs -> config.json -> the monitor
runs `runc run`. Foreground: wait, Ctrl-C stops the container (TERM, then KILL
after the stop timeout or a second Ctrl-C), return its exit code. Detached: wait
until the runtime has started the process, return.

Volumes (runtime/volumes.py) become bind mounts of the bundle; the command is looked
up in the mounted rootfs before the runtime starts, so a missing one is docker's
127/126 (runtime/exec.py). `--restart on-failure[:N]` is kept by the monitor of a
detached container; `stop` and `rm -f` leave a mark so that it is not restarted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from lazyoci.config import PULL_POLICIES, Config
from lazyoci.errors import ConfigError, ContainerError, ImageNotFoundError, LazyociError, StoreError
from lazyoci.images.progress import ProgressSink
from lazyoci.images.service import ImageService, LocalImage
from lazyoci.oci.digest import Digest
from lazyoci.oci.platform import Platform
from lazyoci.runtime.bundle import (GENERATED_FILES, HostOptions, ProcessOptions, build_spec, check_host_options,
                                    process_args, write_bundle)
from lazyoci.runtime.containers import ContainerRecord, ContainerStore, process_start
from lazyoci.runtime.exec import check_command
from lazyoci.runtime.logfile import LogLine, LogReader, iter_chunks, lines_since
from lazyoci.runtime.monitor import STOPPED_MARK, MonitorSpec, spawn_monitor
from lazyoci.runtime.runc import Runtime
from lazyoci.runtime.volumes import MountRequest, VolumeStore, check_mount_kinds, check_unique_targets
from lazyoci.snapshot.mount_syscall import mount_all, unmount
from lazyoci.snapshot.snapshotters import get_snapshotter
from lazyoci.store.layout import DataRoot
from lazyoci.store.modes import write_file

STOP_TIMEOUT = 10.0
ANONYMOUS_VOLUMES = "anonymous-volumes.json"    # in the container directory: removed with it by --rm / rm -v


RESTART_POLICY = "restart-policy"     # in a container's directory: its --restart, if not "no"
STARTED_WAIT = 70.0    # seconds a detached --rm container's monitor waits for `run` to see it start


def parse_restart(policy: str) -> int | None:
    """`--restart no|on-failure[:N]`: None for no, else the most restarts (0 = no limit)."""
    if policy == "no":
        return None
    m = re.fullmatch(r"on-failure(?::(\d+))?", policy)
    if m is None:
        raise ConfigError(f"invalid restart policy {policy!r}: use no or on-failure[:MAX-RETRIES]")
    return int(m.group(1) or 0)


@dataclass(frozen=True)
class RunOptions:
    image: str
    process: ProcessOptions = ProcessOptions()
    name: str | None = None
    detach: bool = False
    interactive: bool = False
    auto_remove: bool = False
    snapshotter: str = "overlayfs"
    runtime: str = "runc"
    pull: str = "missing"
    platform: Platform | None = None
    soci_index_digest: str | None = None     # skip discovery: use this SOCI index (soci only)
    host: HostOptions = HostOptions()         # host-side settings; its mounts are filled in by create()
    mounts: tuple[MountRequest, ...] = ()     # -v / --mount / --tmpfs
    restart: str = "no"                       # --restart no|on-failure[:N] (detached only)

    def check(self) -> None:
        """Flag combinations docker refuses, before anything is pulled or created."""
        check_unique_targets(list(self.mounts), GENERATED_FILES)
        check_host_options(self.host)
        if parse_restart(self.restart) is not None:
            if self.auto_remove:
                raise ConfigError("conflicting options: --restart and --rm")
            if not self.detach:
                raise ConfigError("--restart on-failure is kept by the monitor of a detached container: add -d")


class ContainerManager:
    def __init__(self, root: DataRoot, config: Config, images: ImageService,
                 notices: Callable[[str], None] | None = None) -> None:
        self.root = root
        self.config = config
        self.images = images
        self.notices = notices      # INFO lines of a pull (a lazy pull that falls back says why)
        self.store = ContainerStore(root)

    # ---- images and rootfs ------------------------------------------------
    def ensure_image(self, ref: str, snapshotter_name: str, policy: str, platform: Platform | None,
                     progress: ProgressSink | None, index_digest: str | None = None) -> LocalImage:
        if policy not in PULL_POLICIES:
            raise ConfigError(f"--pull must be one of {', '.join(PULL_POLICIES)}, not {policy!r}")
        image = None
        if index_digest is not None:
            # Malformed: one error now. Whether it is an index of the image is for the pull to
            # check against the registry, so a local image is pulled again (its manifests and
            # zTOCs only) rather than run with an index nobody checked.
            Digest.parse(index_digest)
            if policy == "never":
                raise ConfigError("--soci-index-digest is checked against the registry: not with --pull never")
        elif policy != "always":
            try:
                image = self.images.get(ref, platform)
            except ImageNotFoundError:
                if policy == "never":
                    raise
        if image is None:
            # Each snapshotter pulls its own way (overlayfs: unpack while downloading; soci: lazily).
            # Only a pull needs the registry client: a local image never loads it (tens of ms of CPU).
            snap = get_snapshotter(snapshotter_name, self.root, self.config, self.images.client)
            image = snap.pull(self.images, ref, platform, progress=progress, index_digest=index_digest,
                              log=self.notices)
        return image

    # ---- run ----------------------------------------------------------------
    def create(self, opts: RunOptions, progress: ProgressSink | None = None) -> tuple[ContainerRecord, Runtime]:
        opts.check()
        runtime = Runtime.find(opts.runtime, self.root.path)
        image = self.ensure_image(opts.image, opts.snapshotter, opts.pull, opts.platform, progress,
                                  opts.soci_index_digest)
        snap = get_snapshotter(opts.snapshotter, self.root, self.config)
        argv = process_args(image.config, opts.process)    # fail before anything is created
        cid, name = self.store.new_id_and_name(opts.name)
        top = snap.unpack_image(self.images, image)
        cdir = self.store.make_dir(cid)
        (cdir / "rootfs").mkdir()
        key = f"container-{cid}"
        rec = ContainerRecord(id=cid, name=name, image=image.name or opts.image, image_digest=image.digest,
                              command=tuple(argv), created=time.time(), status="created", exit_code=None,
                              finished=None, snapshotter=snap.name, snapshot_key=key, runtime=runtime.name,
                              auto_remove=opts.auto_remove, detached=opts.detach, monitor_pid=None)
        rec = self.store.create(rec, name_given=opts.name is not None)
        try:
            mounts = snap.prepare(key, top, {"lazyoci/container": cid})
            mount_all(mounts, cdir / "rootfs")
            volume_mounts, anonymous = VolumeStore(self.root).spec_mounts(list(opts.mounts), cdir / "rootfs")
            write_file(cdir / ANONYMOUS_VOLUMES, json.dumps(anonymous).encode())
            check_mount_kinds(cdir / "rootfs", volume_mounts)
            host = dataclasses.replace(opts.host, mounts=tuple(volume_mounts))
            spec = build_spec(image.config, cdir / "rootfs", cdir / "etc", opts.process, host)
            check_command(cdir / "rootfs", spec["process"], tuple(m["destination"] for m in volume_mounts))
            write_bundle(cdir, spec)
        except BaseException:
            self.cleanup(rec, remove_volumes=True)
            raise
        return rec, runtime

    def start(self, rec: ContainerRecord, runtime: Runtime, opts: RunOptions) -> int | None:
        """Run the created container: its exit code (foreground), or None once it runs (detached)."""
        cdir = self.store.dir(rec.id)
        (cdir / STOPPED_MARK).unlink(missing_ok=True)     # a stop before this start does not hold now
        policy = cdir / RESTART_POLICY       # kept, so that `start` and `restart` keep it as docker does
        if opts.restart != "no":
            write_file(policy, opts.restart.encode())
        saved = policy.read_text() if policy.exists() else "no"
        spec = MonitorSpec(rec.id, cdir, runtime, opts.detach, opts.interactive, opts.process.tty,
                           cdir / "container.log", cdir / "pid", cdir / "exit.json",
                           restart_max=parse_restart(saved))
        if not opts.detach:
            monitor_pid, child = spawn_monitor(spec, self.store, lambda code: None)
        elif not opts.auto_remove:
            monitor_pid, _ = spawn_monitor(spec, self.store, lambda code: None)
            self._wait_started(rec, spec, monitor_pid)
            return None
        else:
            # A detached --rm container removes itself when it exits, which may be before this
            # process has seen it start: its monitor waits for a word (or the end of this pipe)
            # from here before it cleans up, so `run -d --rm` of a quick command never reads
            # "failed to start".
            seen_r, seen_w = os.pipe()

            def on_exit(code: int) -> None:
                os.close(seen_w)                     # the monitor's copy: the pipe ends with ours
                _wait_readable(seen_r, STARTED_WAIT)
                self.cleanup(rec, remove_volumes=True)

            try:
                monitor_pid, _ = spawn_monitor(spec, self.store, on_exit)
            finally:
                os.close(seen_r)
            try:
                self._wait_started(rec, spec, monitor_pid)
            finally:
                try:
                    os.write(seen_w, b"1")
                except OSError:
                    pass
                os.close(seen_w)
            return None
        if child is None:   # spawn_monitor gives the process to wait for unless detached
            raise ContainerError(f"container {rec.short_id}: the monitor gave no process to wait for")
        return self._wait_foreground(rec, runtime, child, spec)

    def _wait_started(self, rec: ContainerRecord, spec: MonitorSpec, monitor_pid: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if spec.pid_file.exists() or spec.exit_file.exists():
                break
            if process_start(monitor_pid) is None and not spec.exit_file.exists():
                break
            time.sleep(0.01)
        if not spec.pid_file.exists():
            tail = ""
            if spec.log_path.exists():
                last_lines = spec.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                tail = f": {last_lines[0]}" if last_lines else ""
            raise ContainerError(f"container {rec.short_id} failed to start{tail}")

    def _wait_foreground(self, rec: ContainerRecord, runtime: Runtime, child: int, spec: MonitorSpec) -> int:
        interrupts = []

        def on_sigint(signum, frame) -> None:
            interrupts.append(time.monotonic())
            if len(interrupts) == 1:
                runtime.kill(rec.id, "TERM")
                t = threading.Timer(STOP_TIMEOUT, lambda: runtime.kill(rec.id, "KILL"))
                t.daemon = True
                t.start()
            else:
                runtime.kill(rec.id, "KILL")

        previous = None
        if threading.current_thread() is threading.main_thread() and not spec.tty:
            previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            os.waitpid(child, 0)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        code = self.store.read_exit_file(rec.id)
        if code is None:
            code = 125
        if rec.auto_remove:
            self.cleanup(rec, remove_volumes=True)
        return code

    # ---- stop / rm / logs ---------------------------------------------------
    def _wait_exit(self, rec: ContainerRecord, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.store.get(rec.id).status != "running":
                return True
            time.sleep(0.05)
        return False

    def stop(self, name_or_id: str, timeout: float = STOP_TIMEOUT) -> ContainerRecord:
        rec = self.store.get(name_or_id)
        if rec.status != "running":
            return rec
        runtime = Runtime.find(rec.runtime, self.root.path)
        self._mark_stopped(rec)
        image = self._image_stop_signal(rec)
        runtime.kill(rec.id, image)
        if not self._wait_exit(rec, timeout):
            runtime.kill(rec.id, "KILL")
            if not self._wait_exit(rec, 30):
                raise ContainerError(f"container {rec.name} did not stop")
        return self.store.get(rec.id)

    def _mark_stopped(self, rec: ContainerRecord) -> None:
        """Tell the monitor not to restart the container (a missing directory has no monitor)."""
        try:
            write_file(self.store.dir(rec.id) / STOPPED_MARK, b"")
        except StoreError:
            pass

    def _image_stop_signal(self, rec: ContainerRecord) -> str:
        try:
            sig = self.images.get(rec.image_digest).config.stop_signal
        except LazyociError:
            sig = None
        return (sig or "SIGTERM").upper().removeprefix("SIG")

    def remove(self, name_or_id: str, force: bool = False, volumes: bool = False) -> ContainerRecord:
        """Remove a container; `volumes` (rm -v) also removes the anonymous volumes it created."""
        rec = self.store.get(name_or_id)
        if rec.status == "running":
            if not force:
                raise ContainerError(f"container {rec.name} is running: stop it first or use rm -f")
            self._mark_stopped(rec)
            Runtime.find(rec.runtime, self.root.path).kill(rec.id, "KILL")
            if not self._wait_exit(rec, 30):
                raise ContainerError(f"container {rec.name} could not be killed")
        self.cleanup(rec, remove_volumes=volumes)
        return rec

    def cleanup(self, rec: ContainerRecord, remove_volumes: bool = False) -> None:
        """Undo everything `create` did (also after a crash or reboot left stale state)."""
        cdir = self.store.dir(rec.id)
        anonymous: list[str] = []
        if remove_volumes:
            try:
                anonymous = json.loads((cdir / ANONYMOUS_VOLUMES).read_text())
            except (OSError, ValueError):
                pass
        try:
            Runtime.find(rec.runtime, self.root.path).delete(rec.id)
        except LazyociError:
            pass
        unmount(cdir / "rootfs")
        snap = get_snapshotter(rec.snapshotter, self.root, self.config)
        try:
            snap.remove(rec.snapshot_key)
        except StoreError:
            pass   # never prepared, or already removed
        shutil.rmtree(cdir, ignore_errors=True)
        self.store.delete(rec.id)
        volumes = VolumeStore(self.root)
        for name in anonymous:
            try:
                volumes.remove(name, force=True)
            except LazyociError:
                pass

    def logs(self, name_or_id: str, out: IO[bytes], follow: bool = False, tail: int | None = None,
             since_ns: int | None = None, timestamps: bool = False) -> None:
        """Write the container's output: the last `tail` lines from `since_ns` on, each after the
        time it arrived if `timestamps`; with `follow`, then what comes until it exits."""
        rec = self.store.get(name_or_id)
        reader = LogReader(self.store.dir(rec.id) / "container.log")
        running = follow and rec.status == "running"
        last: deque[LogLine] | None = deque(maxlen=tail) if tail is not None else None

        def write(lines) -> None:
            for chunk in iter_chunks(lines, timestamps):
                out.write(chunk)

        while True:     # what is there now
            lines = lines_since(reader.read(final=not running), since_ns)
            if last is None:
                write(lines)
            else:
                last.extend(lines)
            if reader.caught_up:
                break
        write(last or ())
        out.flush()
        while running:  # what comes next
            time.sleep(0.1)
            running = self.store.get(rec.id).status == "running"
            while True:
                write(lines_since(reader.read(final=not running), since_ns))
                if reader.caught_up:
                    break
            out.flush()


def _wait_readable(fd: int, timeout: float) -> None:
    """Wait until `fd` has a byte or its end (or `timeout` passes), then close it."""
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
