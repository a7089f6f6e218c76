"""The FUSE session holder relays a notification the kernel makes wait without holding up replies.

A real holder and kernel mount, with the test itself attached as the service and speaking the FUSE
protocol: while a reader of the mount's root waits for a READDIR reply, the service asks the
kernel to forget an entry of that directory. The kernel takes that notification only once the
reader has left the directory, so the READDIR reply sent after it must reach the kernel first."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lazyoci.errors import ServiceError
from lazyoci.service.holder_link import HolderPaths, attach, holder_status, launch_holder, stop_holder

pytestmark = pytest.mark.needs_root("FUSE mounts")

_IN = struct.Struct("<IIQQ")          # struct fuse_in_header's len, opcode, unique, nodeid
_IN_SIZE = 40                         # the whole struct fuse_in_header
_OUT = struct.Struct("<IiQ")          # struct fuse_out_header: len, error, unique
_LOOKUP, _GETATTR, _INIT, _OPENDIR, _READDIR, _RELEASEDIR, _READDIRPLUS = 1, 3, 26, 27, 28, 29, 44
_NO_REPLY = {2, 36, 41, 42}           # FORGET, INTERRUPT, NOTIFY_REPLY, BATCH_FORGET
_NOTIFY_INVAL_ENTRY = 3


def _reply(sock: socket.socket, unique: int, body: bytes = b"", error: int = 0) -> None:
    sock.send(_OUT.pack(_OUT.size + len(body), -error, unique) + body)


def _init_reply(request: bytes) -> bytes:
    """struct fuse_init_out: the kernel's version and read-ahead, no flags, modest limits."""
    major, minor, max_readahead = struct.unpack_from("<III", request, _IN_SIZE)
    return struct.pack("<IIIIHHIIHHI28x", major, minor, max_readahead, 0, 16, 12, 128 << 10, 1, 32, 0, 0)


def _root_attr() -> bytes:
    """struct fuse_attr_out of an empty directory owned by root."""
    attr = struct.pack("<QQQQQQIIIIIIIIII", 1, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096, 0)
    return struct.pack("<QII", 1, 0, 0) + attr


def _forget_entry(parent: int, name: bytes) -> bytes:
    """A FUSE_NOTIFY_INVAL_ENTRY message: unique 0, the notification's code where a reply has its error."""
    body = struct.pack("<QII", parent, len(name), 0) + name + b"\0"
    return _OUT.pack(_OUT.size + len(body), _NOTIFY_INVAL_ENTRY, 0) + body


def _serve(sock: socket.socket, stop: threading.Event, readdirs: list[float]) -> None:
    """Answer the kernel as an empty filesystem would; at each READDIR, first ask the kernel to
    forget an entry of the directory being read, then answer the READDIR a moment later."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            message = sock.recv(1 << 21)
        except TimeoutError:
            continue
        except OSError:
            return
        if not message:
            return
        _, opcode, unique, nodeid = _IN.unpack_from(message)
        if opcode in _NO_REPLY:
            continue
        if opcode == _INIT:
            _reply(sock, unique, _init_reply(message))
        elif opcode == _GETATTR:
            _reply(sock, unique, _root_attr())
        elif opcode == _OPENDIR:
            _reply(sock, unique, struct.pack("<QII", 1, 0, 0))
        elif opcode in (_READDIR, _READDIRPLUS):
            sock.send(_forget_entry(nodeid, b"gone"))
            time.sleep(0.3)          # the holder now writes the notification, and the kernel waits
            readdirs.append(time.monotonic())
            _reply(sock, unique)     # no entries: the end of the directory
        elif opcode == _RELEASEDIR:
            _reply(sock, unique)
        elif opcode == _LOOKUP:
            _reply(sock, unique, error=errno.ENOENT)
        else:
            _reply(sock, unique, error=errno.ENOSYS)


def _abort_connection(dev: int) -> None:
    """End a hung FUSE connection (the mount's device number names it in fusectl), so that the
    mount can be taken down; nothing may stat the hung mount itself. fusectl is unmounted again
    if it was mounted here."""
    conns = Path("/sys/fs/fuse/connections")
    mounted_here = not os.path.ismount(conns)
    if mounted_here:
        subprocess.run(["mount", "-t", "fusectl", "none", os.fspath(conns)], check=True)
    try:
        (conns / str(dev) / "abort").write_text("1")
    finally:
        if mounted_here:
            subprocess.run(["umount", os.fspath(conns)], check=False)


def test_a_notification_the_kernel_holds_back_does_not_stop_replies(tmp_path):
    paths = HolderPaths(tmp_path / "service")
    mountpoint = paths.dir / "mnt"
    mountpoint.mkdir(parents=True)
    launch_holder(paths)
    stop, readdirs = threading.Event(), []
    server: threading.Thread | None = None
    hung = False
    try:
        channel = socket.socket(fileno=attach(paths, relaunch=[]).fd)
        server = threading.Thread(target=_serve, args=(channel, stop, readdirs), daemon=True)
        server.start()
        listed: list[list[str]] = []
        dev = os.stat(mountpoint).st_dev          # answered by the service: the mount is up
        reader = threading.Thread(target=lambda: listed.append(os.listdir(mountpoint)), daemon=True)
        reader.start()
        reader.join(10)
        hung = reader.is_alive()
        if hung:
            _abort_connection(dev)
            reader.join(10)
        assert not hung, "the READDIR reply waited behind a notification the kernel held back"
        assert listed == [[]] and readdirs
        status = holder_status(paths)
        assert status is not None and status["attached"] and status["relayed"] >= 2
        deadline = time.monotonic() + 10
        while (holder_status(paths) or {}).get("notifications_waiting"):
            assert time.monotonic() < deadline, "the kernel never took the notification"
            time.sleep(0.05)
        assert os.stat(mountpoint).st_dev == dev
    finally:
        stop.set()
        try:
            stop_holder(paths)
        except ServiceError:
            if not hung:      # an aborted connection ends the holder: stopping it may find it going
                raise
        if server is not None:
            server.join(5)
