"""ServiceClient: what the CLI and the soci snapshotter use to talk to the lazyoci service."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lazyoci.errors import ServiceError
from lazyoci.proc_stat import running
from lazyoci.service.error_wire import error_from_reply
from lazyoci.service.holder_link import HolderPaths, holder_alive, read_takeover, stop_holder
from lazyoci.service.paths import ServicePaths, connect, pid_file_locked
from lazyoci.store.layout import DataRoot

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class ServiceClient:
    """JSON requests over <root>/service/lazyoci.sock; starts the daemon on demand."""

    def __init__(self, root: DataRoot, config_path: Path | None = None, timeout: float = 600.0) -> None:
        self.root = root
        self.paths = ServicePaths(root)
        self.holder = HolderPaths(self.paths.dir)
        self.config_path = config_path
        self.timeout = timeout
        self._spawning: threading.Thread | None = None    # a launch under way (spawn)

    # -- protocol --------------------------------------------------------------

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request; raise the service's error as the same LazyociError subclass."""
        try:
            sock = connect(self.paths.socket, self.timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ServiceError("the lazyoci service is not running (start it with `lazyoci service start`)") from None
        except OSError as e:
            raise ServiceError(f"cannot reach the lazyoci service at {self.paths.socket}: {e.strerror or e}") from None
        with sock:
            try:
                sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            except socket.timeout:
                raise ServiceError(f"the lazyoci service did not answer {op!r} within {self.timeout:.0f}s") from None
            except OSError as e:
                raise ServiceError(f"lost the lazyoci service during {op!r}: {e.strerror or e}") from None
        try:
            reply = json.loads(buf)
        except ValueError:
            raise ServiceError(f"the lazyoci service sent a malformed reply to {op!r}") from None
        if not isinstance(reply, dict):
            raise ServiceError(f"the lazyoci service sent a malformed reply to {op!r}")
        if not reply.get("ok"):
            raise error_from_reply(reply)
        return reply

    def ping(self) -> dict[str, Any] | None:
        """The service's pid and mountpoint, or None if it is not running."""
        try:
            return self.request("ping")
        except ServiceError:
            return None

    # -- lifecycle ----------------------------------------------------------------

    def is_running(self) -> bool:
        return self.ping() is not None

    def spawn(self) -> None:
        """Launch the daemon if it is not running, without waiting for it (start() waits).

        Lets a lazy pull start the service while it fetches the image's metadata: the launcher
        (Python's start and the daemon's imports, until it detaches) runs in a thread of its
        own, which start() joins; a launch that failed is retried and reported by start()."""
        if self._spawning is not None and self._spawning.is_alive():
            return
        if self.ping() is None:
            def launch() -> None:
                try:
                    self._launch()
                except ServiceError:
                    pass           # start() launches again and reports why
            self._spawning = threading.Thread(target=launch, name="lazyoci-service-launch", daemon=True)
            self._spawning.start()

    def start(self) -> dict[str, Any]:
        """Start the daemon (if not running) and wait until it answers."""
        if self._spawning is not None:
            self._spawning.join()
        info = self.ping()
        if info is not None:
            return info
        log_start = self.paths.log_file.stat().st_size if self.paths.log_file.exists() else 0
        launches = 0
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            info = self.ping()
            if info is not None:
                return info
            if not self._daemon_alive():
                if launches == 3:
                    break    # it died while starting: its log says why
                # (a daemon that is still dying, e.g. killed, holds the lock a little longer,
                # and a launcher that met its lock left: try again)
                self._launch()
                launches += 1
                continue
            time.sleep(0.02)
        raise ServiceError(f"the lazyoci service did not start; its log says: {self._log_tail(log_start)}")

    def _launch(self, take_over: bool = False) -> None:
        """Run the daemon (it detaches; a second one for the same root exits by itself unless it
        is to `take_over`: then it gets ready and waits for the running one to hand over)."""
        self.paths.ensure()
        cmd = [sys.executable, "-m", "lazyoci.service.daemon", "--root", os.fspath(self.root.path)]
        if self.config_path is not None:
            cmd += ["--config", os.fspath(self.config_path)]
        if take_over:
            cmd.append("--take-over")
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise ServiceError(f"the lazyoci service did not start: {last[0]}")

    def ensure_running(self) -> dict[str, Any]:
        return self.start()

    def users(self) -> list[str]:
        """Mount points of overlays stacked on the service's layers (running containers, image mounts)."""
        mnts = [os.fspath(m) + "/" for m in self.paths.mountpoints]
        out = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "overlay" and any(m in fields[-1] for m in mnts):
                    out.append(fields[4])
        return out

    def user_names(self, users: list[str]) -> list[str]:
        """The containers (by name) and image mounts (by path) behind overlay mount points."""
        from lazyoci.runtime.containers import ContainerStore

        store = ContainerStore(self.root)
        prefix = os.fspath(self.root.containers) + "/"
        out = []
        for target in users:
            record = None
            if target.startswith(prefix):
                record = store.try_get(target[len(prefix):].split("/", 1)[0])
            out.append(record.name if record is not None else target)
        return out

    def stale_mount(self) -> Path | None:
        """One of the service's FUSE mountpoints if it is still mounted while neither the daemon
        nor the session holder lives (killed, or an older lazyoci's).

        Such a mount answers "transport endpoint is not connected"; `start` detaches it."""
        if self._daemon_alive() or holder_alive(self.holder):
            return None
        targets = {os.fspath(m): m for m in self.paths.mountpoints}
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[4] in targets and fields[sep + 1].startswith("fuse"):
                    return targets[fields[4]]
        return None

    def stop(self, force: bool = False, hand_over: bool = False) -> bool:
        """Stop the service and unmount its layers; wait for it. False if nothing was running.

        Overlays on its layers would lose their lower directories, so unless `force` the
        service is left running while any exist. `hand_over` stops the service alone: the
        session holder keeps the mount, their reads wait until the next `start` takes over.
        """
        with self._one_at_a_time():
            return self._stop(force, hand_over)

    def _stop(self, force: bool, hand_over: bool) -> bool:
        users = self.users()
        if users and not (force or hand_over):
            names = self.user_names(users)
            raise ServiceError(f"{len(names)} container(s) or image mount(s) still use lazy layers "
                               f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); stop them "
                               f"first, use --hand-over to keep them waiting for the next start, or "
                               f"--force to break them")
        stopped = self._stop_daemon("hand_over" if hand_over else "shutdown")
        if not hand_over:
            stopped = stop_holder(self.holder) or stopped
        return stopped

    def restart(self) -> dict[str, Any]:
        """Hand the FUSE sessions over to a new service process (new config, new code); its ping.

        The new process starts beside the running one and mounts the recorded layers; only
        then does the running one hand over, so containers reading lazy layers pause for the
        hand-over alone: what the old process had not answered, the new one answers. A new
        process that cannot get ready (a bad config file) leaves the running one serving."""
        with self._one_at_a_time():
            return self._restart()

    def _restart(self) -> dict[str, Any]:
        old = self.ping()
        if old is None:
            return self.start()
        self.holder.takeover_file.unlink(missing_ok=True)
        log_start = self.paths.log_file.stat().st_size if self.paths.log_file.exists() else 0
        self._launch(take_over=True)
        started = time.monotonic()
        while not (note := read_takeover(self.holder) or {}).get("ready"):
            pid = note.get("pid")
            if pid is None and (info := self.ping()) is not None and info["pid"] != old["pid"]:
                return info            # the old one was gone already: the new one simply started
            late = time.monotonic() - started > (START_TIMEOUT if pid is not None else 10.0)
            if late or (pid is not None and not running(int(pid))):
                if pid is not None and running(int(pid)):
                    os.kill(int(pid), signal.SIGTERM)     # ours, still getting ready: the old one serves on
                raise ServiceError(f"the new lazyoci service did not get ready (pid {old['pid']} still serves); "
                                   f"its log says: {self._log_tail(log_start)}")
            time.sleep(0.01)
        try:
            self.request("hand_over")
        except ServiceError:
            pass                       # gone already
        deadline = time.monotonic() + START_TIMEOUT
        while (info := self.ping()) is None or info["pid"] == old["pid"]:
            if time.monotonic() > deadline:
                raise ServiceError(f"the new lazyoci service (pid {note['pid']}) did not take over within "
                                   f"{START_TIMEOUT:.0f}s; its log says: {self._log_tail(log_start)}")
            if not running(int(note["pid"])):
                return self.start()    # the new one died: start one the ordinary way
            time.sleep(0.005)
        return info

    def _stop_daemon(self, op: str) -> bool:
        if not self._ask_to_stop(op):
            return False
        pid = self._pid()
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._daemon_alive():   # its lock goes with the process
            if time.monotonic() > deadline:
                raise ServiceError(f"the lazyoci service (pid {pid}) did not stop within {STOP_TIMEOUT:.0f}s")
            time.sleep(0.01)
        return True

    def _ask_to_stop(self, op: str) -> bool:
        """Send `op` (shutdown, hand_over) to the daemon; False if none runs.

        A daemon that holds the pid file's lock but does not answer yet is still getting ready
        (starting the session holder, mounting the recorded layers): it is asked once it answers.
        Asked nothing, it went on starting while `stop` waited for it to end, and `stop` failed
        after STOP_TIMEOUT with the service running."""
        deadline = time.monotonic() + START_TIMEOUT
        seen = False
        while True:
            try:
                self.request(op)
                return True
            except ServiceError:
                if not self._daemon_alive():
                    return seen            # never there, or gone while it was being asked
                seen = True
                if self.ping() is not None:    # it answers now (or refused the request): once more,
                    self.request(op)           # its error if it refuses again
                    return True
                if time.monotonic() > deadline:
                    raise ServiceError(f"the lazyoci service (pid {self._pid()}) did not get ready to "
                                       f"stop within {START_TIMEOUT:.0f}s") from None
            time.sleep(0.02)

    # -- requests -------------------------------------------------------------------

    def mount_layer(self, ref: str, layer_digest: str, index_digest: str) -> Path:
        """Serve a lazy layer; returns its directory in the FUSE mount. (The request's field is
        still `ztoc_digest`, so a service started by an older lazyoci understands it.)"""
        reply = self.request("mount_layer", ref=ref, layer_digest=layer_digest, ztoc_digest=index_digest)
        return Path(reply["path"])

    def begin_mount(self, ref: str, layer_digest: str, index_digest: str) -> None:
        """`mount_layer`: the service answers once the view is served."""
        self.mount_layer(ref, layer_digest, index_digest)

    def unmount_layer(self, layer_digest: str, index_digest: str) -> bool:
        """Stop serving the layer's view through that index (its other indexes' views stay)."""
        reply = self.request("unmount_layer", layer_digest=layer_digest, ztoc_digest=index_digest)
        return bool(reply.get("unmounted"))

    def view_dir(self, layer_digest: str, index_digest: str) -> Path:
        """Where the layer's view through that index appears in the FUSE mount (served or not)."""
        return self.paths.view_dir(layer_digest, index_digest)

    def lower_dir(self, layer_digest: str, index_digest: str) -> Path:
        """The view's directory for an overlay: in the plain mount where it is served there."""
        return self.paths.lower_dir(layer_digest, index_digest)

    def recorded_views(self) -> list[tuple[str, str]]:
        """The (layer, index) views the service serves, or mounts again when it starts."""
        from lazyoci.service.view_records import recorded_views
        from lazyoci.store.db import Database

        return recorded_views(Database(self.root.db_path))

    def release_views(self, views: list[tuple[str, str]]) -> None:
        """Stop serving these views; while the service is down, drop them from what it mounts at start."""
        if not views:
            return
        if self.is_running():
            for layer_digest, index_digest in views:
                self.unmount_layer(layer_digest, index_digest)
            return
        from lazyoci.service.view_records import forget_layers
        from lazyoci.store.db import Database

        forget_layers(Database(self.root.db_path), views)

    def status(self) -> dict[str, Any]:
        return self.request("status")

    # -- helpers ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _one_at_a_time(self) -> Iterator[None]:
        """Hold the lifecycle lock: a `stop` and a `restart` run one after the other, whichever
        processes asked. Interleaved, a restart's new process waiting to take over got the service
        from a stop's shutdown and ran on, and the stop either said it had stopped the service or
        waited 30 s for it to end and failed."""
        try:
            fd = os.open(self.paths.lifecycle_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:   # no service directory: no service ever ran here, nothing to wait for
            yield
            return
        try:
            deadline = time.monotonic() + START_TIMEOUT + STOP_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ServiceError("another `service stop` or `service restart` of this data root "
                                           "is still under way") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)            # the lock goes with it

    def _daemon_alive(self) -> bool:
        """True while a daemon holds the pid file's lock."""
        return pid_file_locked(self.paths.pid_file)

    def _pid(self) -> int | None:
        try:
            return int(self.paths.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _log_tail(self, since: int) -> str:
        try:
            with open(self.paths.log_file, "rb") as f:
                f.seek(since)
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) if lines else "(nothing)"
