"""How the service and the CLI reach the FUSE session holder (service/session_holder.py).

    <root>/service/holder.sock   the holder's control socket (SOCK_SEQPACKET, 0600)
    <root>/service/holder.pid    its pid, locked while it lives
    <root>/service/holder.log    its log
    <root>/service/holder.lost   written by the service that saw the holder die (when, which pid)
    <root>/service/takeover      a service process started by `service restart`: its pid, and
                                 whether it has mounted the layers and waits for the hand-over
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazyoci.errors import ServiceError
from lazyoci.service.paths import pid_file_locked, socket_address

STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class HolderPaths:
    dir: Path        # <root>/service

    @property
    def socket(self) -> Path:
        return self.dir / "holder.sock"

    @property
    def pid_file(self) -> Path:
        return self.dir / "holder.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "holder.log"

    @property
    def lost_file(self) -> Path:
        return self.dir / "holder.lost"

    @property
    def takeover_file(self) -> Path:
        return self.dir / "takeover"


@dataclass(frozen=True)
class Attachment:
    """A service's end of the FUSE channel: libfuse serves it as `/dev/fd/<fd>`."""

    fd: int
    resumed: bool        # the kernel's session was served by an earlier service process
    waiting: int         # requests the holder hands over (taken by a process that is gone)
    holder_pid: int


def holder_alive(paths: HolderPaths) -> bool:
    """True while a holder holds its pid file's lock."""
    return pid_file_locked(paths.pid_file)


def holder_pid(paths: HolderPaths) -> int | None:
    try:
        return int(paths.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def launch_holder(paths: HolderPaths) -> None:
    """Start the holder (it mounts a fresh FUSE session) unless one runs; returns once it listens."""
    if holder_alive(paths):
        return
    proc = subprocess.run([sys.executable, "-m", "lazyoci.service.session_holder",
                           "--service-dir", os.fspath(paths.dir)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise ServiceError(f"the FUSE session holder did not start: {last[0]}")


def _connect(paths: HolderPaths) -> socket.socket:
    addr, dfd = socket_address(paths.socket)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(STOP_TIMEOUT)
    try:
        sock.connect(addr)
    except OSError as e:
        sock.close()
        raise ServiceError(f"cannot reach the FUSE session holder at {paths.socket}: {e.strerror or e}") from None
    finally:
        if dfd is not None:
            os.close(dfd)
    return sock


def _ask(sock: socket.socket, op: str, **fields: Any) -> dict[str, Any]:
    try:
        sock.send(json.dumps({"op": op, **fields}).encode())
        reply = json.loads(sock.recv(65536) or b"{}")
    except (OSError, ValueError) as e:
        raise ServiceError(f"the FUSE session holder did not answer {op!r}: {e}") from None
    if not reply.get("ok"):
        raise ServiceError(f"the FUSE session holder refused {op!r}: {reply.get('error', 'no answer')}")
    return dict(reply)


def attach(paths: HolderPaths, relaunch: list[str]) -> Attachment:
    """Take over the holder's FUSE session: a fresh one, or the one a previous service served.

    `relaunch` is the command line that starts this service: the holder runs it if the
    service is lost without saying `leaving` first."""
    # only the service attaches: the CLI, which reaches the holder through this module too, does
    # not import the holder's own module (13 ms of a `pull` or `run` start)
    from lazyoci.service.session_holder import set_channel_buffers

    sock = _connect(paths)
    try:
        set_channel_buffers(sock)
        reply = _ask(sock, "attach", relaunch=relaunch)
        sock.setblocking(True)
    except BaseException:
        sock.close()
        raise
    return Attachment(fd=sock.detach(), resumed=bool(reply["resumed"]), waiting=int(reply["waiting"]),
                      holder_pid=int(reply["pid"]))


def holder_status(paths: HolderPaths) -> dict[str, Any] | None:
    """The holder's pid, RSS, whether a service is attached, how many requests wait; None if gone."""
    if not holder_alive(paths):
        return None
    try:
        with _connect(paths) as sock:
            return _ask(sock, "status")
    except ServiceError:
        return None


def serve_reads(paths: HolderPaths, slot: int, data_fd: int, states_fd: int, map_fd: int) -> None:
    """Hand the holder the READs of the layer in `slot` (service/holder_reads.py): its span cache
    data file and span states, and its read map. Only the attached service may; ServiceError if
    refused."""
    with _connect(paths) as sock:
        try:
            socket.send_fds(sock, [json.dumps({"op": "serve", "slot": slot}).encode()],
                            [data_fd, states_fd, map_fd])
        except OSError as e:
            raise ServiceError(f"cannot hand READs to the FUSE session holder: {e}") from None
        try:
            reply = json.loads(sock.recv(65536) or b"{}")
        except (OSError, ValueError) as e:
            raise ServiceError(f"the FUSE session holder did not answer 'serve': {e}") from None
        if not reply.get("ok"):
            raise ServiceError(f"the FUSE session holder refused 'serve': {reply.get('error', 'no answer')}")


def withdraw_reads(paths: HolderPaths, slot: int) -> None:
    """Take the READs of the layer in `slot` back; once this returns, the holder answers none.
    A holder that cannot be reached serves nothing (it is gone, and its mount with it)."""
    if not holder_alive(paths):
        return
    try:
        with _connect(paths) as sock:
            _ask(sock, "withdraw", slot=slot)
    except ServiceError:
        if holder_alive(paths):
            raise


def say_leaving(paths: HolderPaths) -> None:
    """Tell the holder this service detaches on purpose (it is not to be started again)."""
    try:
        with _connect(paths) as sock:
            _ask(sock, "leaving", pid=os.getpid())
    except ServiceError:
        pass       # no holder: nothing to start anything again


def stop_holder(paths: HolderPaths) -> bool:
    """Detach the mount and end the holder (whatever still reads the mount gets errors). False if none ran."""
    if not holder_alive(paths):
        return False
    try:
        with _connect(paths) as sock:
            _ask(sock, "stop")
    except ServiceError:
        if not holder_alive(paths):
            return False
        raise
    deadline = time.monotonic() + STOP_TIMEOUT
    while holder_alive(paths):
        if time.monotonic() > deadline:
            raise ServiceError(f"the FUSE session holder (pid {holder_pid(paths)}) did not stop "
                               f"within {STOP_TIMEOUT:.0f}s")
        time.sleep(0.02)
    return True


def record_lost(paths: HolderPaths, pid: int) -> None:
    """Note that the holder died under the service (its mount's readers got errors)."""
    paths.lost_file.write_text(json.dumps({"pid": pid, "time": time.time()}) + "\n")
    os.chmod(paths.lost_file, 0o600)


def write_takeover(paths: HolderPaths, pid: int, ready: bool) -> None:
    """Say that process `pid` is getting ready to take over from the running service, or is ready."""
    tmp = paths.takeover_file.with_name(f"takeover.{pid}")
    tmp.write_text(json.dumps({"pid": pid, "ready": ready}) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, paths.takeover_file)


def read_takeover(paths: HolderPaths) -> dict[str, Any] | None:
    try:
        return dict(json.loads(paths.takeover_file.read_text()))
    except (OSError, ValueError):
        return None


def lost_note(paths: HolderPaths) -> dict[str, Any] | None:
    """What record_lost wrote, unless a holder started since."""
    try:
        return dict(json.loads(paths.lost_file.read_text()))
    except (OSError, ValueError):
        return None
