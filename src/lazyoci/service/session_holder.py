"""The FUSE session holder: owns `/dev/fuse` and the mount, so the service can restart under running containers.

The kernel talks to a FUSE filesystem through one `/dev/fuse` descriptor, sends
FUSE_INIT once per connection and aborts the mount when the last descriptor
closes. So a small process of its own holds that descriptor and relays the
protocol, message for message, between the kernel and the service over a
SOCK_SEQPACKET unix socket (one FUSE message per packet; libfuse serves it as
its mountpoint `/dev/fd/N`). It keeps what a new service process needs to take
the session over:

- the kernel's INIT request: replayed to each new service process, whose reply is
  swallowed (the kernel negotiated once and must not hear from INIT again);
- every request relayed but not yet answered (it sees the replies, so it knows):
  re-sent to the next service process, so a read the dead process had taken is
  answered, not lost.

It answers requests whose answer does not depend on the service or the node, without the
round trip through the service:

- GETXATTR of overlayfs' own xattrs other than the opaque marker, which no node of the mount
  has (overlay_xattr_reply);
- READ of a file that passed its header check, of spans in the span cache that reads touched
  before, in a layer the service handed over (every file of a layer complete in the span cache
  and checked): read from the cache's data file here (service/holder_reads.py);
- LOOKUP in a directory whose names the service listed: of a name it does not have, and of a
  node that passed its header check (the service wrote its entry); GETXATTR of the opaque marker
  of such a node; READDIR of such a directory past its last entry (service/holder_reads.py);
- OPEN and OPENDIR, with ENOSYS, when the kernel's INIT says it takes that as "opens need no
  message" (zero-message opens, OpenSkipper): from then on it sends no OPEN, OPENDIR, RELEASE or
  RELEASEDIR at all, keeps the page cache of files across opens and caches directory listings.
  Opening leaks nothing unchecked: the kernel reaches a node only through a LOOKUP, which the
  service answers after the node's header check, and the service checks again on every READ
  and READDIR. Those then carry the file handle 0; the holder puts the node ID in its place,
  the handle the service's open and opendir would have given.

It holds a second connection, the plain mount (`<root>/service/mnt-plain`), and relays it to the
same service session: the service shows there only the layers with no xattr and no opaque
directory (fs/layer_fs.py), so the holder answers the first GETXATTR of that connection with
ENOSYS, and the kernel asks it for none again (overlayfs asks every lower file and directory it
looks up for up to four xattrs, and FUSE caches none: most of a container start's requests). A
getxattr there fails with EOPNOTSUPP instead of ENODATA, as on the reference's mounts of layers
marked `disable-xattrs`; a listxattr still reaches the service, which lists none. The service sees
that mount's requests with PLAIN_TAG set in their unique and its root as node PLAIN_ROOT; the
holder answers its INIT with the first connection's reply, and its DESTROY itself (the service's
session must not end with it), and sends the service's notifications to both.

It writes the service's notifications to the kernel from a thread of its own (Notifier): the
kernel takes an entry-invalidate notification only once it holds the directory's lock, which a
reader of that directory keeps while it waits for a READDIR reply that only this relay can
deliver; written from the relay loop, the two would wait for each other for ever.

It adds to the service's INIT reply what libfuse, as pyfuse3 drives it, does not ask for:
READLINK answers kept in the page cache (FUSE_CACHE_SYMLINKS) and lookups in one directory
that need not wait for one another (FUSE_PARALLEL_DIROPS); and it sets the mount's read-ahead
to a whole FUSE request once the kernel has taken the INIT reply.

While no service is attached, it does not read `/dev/fuse`: new requests wait in
the kernel's queue and their readers see a pause, not an error. A service that
goes without saying so first and leaves its pid file behind (killed, out of memory)
is started again by the holder with the command line it attached with; if that one does not attach within
RELAUNCH_SECONDS, the holder tries no more (a service that cannot start is not
started in a loop) and `lazyoci service start` is the way. If the holder
itself dies, the kernel aborts the connection: readers get an error at once
(ENOTCONN), never a hang.

It imports little (the standard library, `lazyoci.libc` and its table of served layers), holds
nothing but descriptors, the unanswered requests and the served layers' maps, and asks
the kernel never to pick it when memory runs out. Control requests (one JSON packet in, one out)
on `<root>/service/holder.sock`:
    {"op": "attach", "relaunch": [argv]} -> {"ok": true, "resumed": bool, ...}; the socket is then
                                            the FUSE channel; argv starts a service after a crash
    {"op": "leaving", "pid": N} -> {"ok": true}; service N is about to detach on purpose
    {"op": "serve", "slot": S} + descriptors of the layer's cache data file, span states and read
                      map (SCM_RIGHTS) -> {"ok": true}; from the attached service only: READs of slot S
                      are answered here where they can be
    {"op": "withdraw", "slot": S} -> {"ok": true, "served": bool}; from then on READs of S go to the service
    {"op": "status"}  -> {"ok": true, "pid", "rss_bytes", "attached", "waiting", "relayed", "service_pid",
                          "notifications_waiting": notifications the kernel has not taken yet,
                          "opcodes": {opcode: [relayed, answered here]}, "service_seconds": {opcode: the
                          seconds its relayed requests waited for the service's replies, summed}, ...}
    {"op": "stop"}    -> {"ok": true}; then detaches the mount and exits

Run as `python -m lazyoci.service.session_holder --root R`: it mounts, listens, then
detaches (double fork); the launcher returns once the holder can be attached to.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from lazyoci import libc
from lazyoci.service.holder_reads import PLAIN_ROOT, ServedReads
from lazyoci.service.process import daemonize, rss_bytes

log = logging.getLogger("lazyoci.holder")

# struct fuse_in_header: len, opcode, unique, nodeid, ... (Linux include/uapi/linux/fuse.h)
_IN_HEADER = struct.Struct("<IIQQ")
# struct fuse_out_header: len, error, unique
_OUT_HEADER = struct.Struct("<IiQ")
_IN_HEADER_SIZE = 40                  # the whole struct fuse_in_header
_FUSE_FORGET, _FUSE_INIT, _FUSE_INTERRUPT, _FUSE_NOTIFY_REPLY, _FUSE_BATCH_FORGET = 2, 26, 36, 41, 42
_FUSE_LOOKUP, _FUSE_GETXATTR, _FUSE_DESTROY = 1, 22, 38
_ROOT_ID = 1                          # FUSE_ROOT_ID: every mount's root
# Set in the unique of a plain mount's request as the service sees it (the kernel's uniques are
# counters far below it), and taken off its reply.
PLAIN_TAG = 1 << 63
_UNIQUE_AT, _NODEID_AT = 8, 16        # in struct fuse_in_header; struct fuse_interrupt_in's unique at 40
_FUSE_OPEN, _FUSE_READ, _FUSE_OPENDIR, _FUSE_READDIR, _FUSE_READDIRPLUS = 14, 15, 27, 28, 44
# struct fuse_init_in / fuse_init_out after their headers: major, minor, max_readahead, flags
_INIT_FLAGS = struct.Struct("<IIII")
_NO_OPEN_SUPPORT, _PARALLEL_DIROPS, _CACHE_SYMLINKS, _NO_OPENDIR_SUPPORT = 1 << 17, 1 << 18, 1 << 23, 1 << 24
_ADDED_FLAGS = _PARALLEL_DIROPS | _CACHE_SYMLINKS
_Q = struct.Struct("<Q")              # a 64-bit field: a unique, a node ID
_FH = _Q                              # the file handle that starts struct fuse_read_in (READ, READDIR*)
_GETXATTR_IN_SIZE = 8                 # struct fuse_getxattr_in: size, padding; the name follows
_OVERLAY_PREFIX, _OVERLAY_OPAQUE = b"trusted.overlay.", b"trusted.overlay.opaque"
_LISTINGS = frozenset({_FUSE_READDIR, _FUSE_READDIRPLUS})
_NO_REPLY = frozenset({_FUSE_FORGET, _FUSE_INTERRUPT, _FUSE_NOTIFY_REPLY, _FUSE_BATCH_FORGET})

# The largest message either way: a READ reply of FUSE's 256-page maximum plus headers.
# The packet buffers of the channel are forced above it (a SEQPACKET message must fit whole).
MAX_MESSAGE = (1 << 20) + 4096
CHANNEL_BUFFER = 4 << 20
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MNT_DETACH = 1, 2, 4, 2
RELAUNCH_SECONDS = 10.0
# The mount's read-ahead: FUSE's largest request (256 pages), where the kernel's default (128 KiB)
# splits every read-ahead window and every fault around a page of a mapped library into 128 KiB
# requests, each a round trip through the holder and the service.
READ_AHEAD_KIB = 1024
_BATCH = 64                   # messages relayed one way before looking at the other
_CONTROL_TIMEOUT = 1.0    # a control client's request comes at once; the relay waits meanwhile


def set_channel_buffers(sock: socket.socket) -> None:
    """Make room for the largest FUSE message in one packet (root may exceed the sysctl limits)."""
    for force, plain in ((getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF),
                         (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, CHANNEL_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, CHANNEL_BUFFER)


def _set_oom_score_adj(value: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        pass


def _killable() -> None:
    """In a service the holder starts: the OOM killer may pick it as it would any process
    (the holder's own exemption is inherited otherwise)."""
    _set_oom_score_adj(0)


def _mounted(target: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def set_read_ahead(mountpoint: str, kib: int) -> None:
    """Set the read-ahead of the FUSE mount at mountpoint. Only after the kernel has taken the INIT
    reply: it lowers the read-ahead to what that reply allows. Its device is read from mountinfo, as
    a stat of the mount would be a FUSE request this process itself has to relay."""
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                dev = fields[2]
    if dev is None:
        return
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(f"{kib}\n")
    except OSError as e:
        log.warning("cannot set the read-ahead of %s: %s", mountpoint, e)


def mount_fuse(mountpoint: str) -> int:
    """Open /dev/fuse and mount it read-only at mountpoint, as libfuse would; returns the descriptor.

    A dead mount a killed holder left behind is detached first."""
    if _mounted(mountpoint):
        log.warning("detaching a stale mount at %s", mountpoint)
        libc.umount2(mountpoint, _MNT_DETACH)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    st = os.stat(mountpoint)
    data = f"fd={fd},rootmode={st.st_mode & 0o170000:o},user_id=0,group_id=0,default_permissions"
    try:
        libc.mount("lazyoci", mountpoint, "fuse.lazyoci", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, data)
    except BaseException:
        os.close(fd)
        raise
    return fd


def overlay_xattr_reply(message: bytes | bytearray) -> bytes | None:
    """ENODATA for a GETXATTR of one of overlayfs' own xattrs other than the opaque marker, answered
    here without the round trip through the service; None for any other request.

    overlayfs asks every lower file and directory it looks up for them (metacopy, redirect, origin:
    most of a container start's requests), and no node of the mount ever has one: the lazy
    filesystem drops them from a layer's tar and makes only the opaque marker (fs/layer_fs.py)."""
    _, opcode, unique, _ = _IN_HEADER.unpack_from(message)
    if opcode != _FUSE_GETXATTR:
        return None
    name = message[_IN_HEADER_SIZE + _GETXATTR_IN_SIZE:].split(b"\0", 1)[0]
    if not name.startswith(_OVERLAY_PREFIX) or name == _OVERLAY_OPAQUE:
        return None
    return _OUT_HEADER.pack(_OUT_HEADER.size, -errno.ENODATA, unique)


def plain_reply(opcode: int, unique: int) -> bytes | None:
    """The holder's own answer to a request of the plain mount, or None to relay it: ENOSYS to
    GETXATTR (the kernel then asks that connection for none: none of its layers has an xattr), and
    DESTROY, which the service's one session must not take for its own end."""
    if opcode == _FUSE_GETXATTR:
        return _OUT_HEADER.pack(_OUT_HEADER.size, -errno.ENOSYS, unique)
    if opcode == _FUSE_DESTROY:
        return _OUT_HEADER.pack(_OUT_HEADER.size, 0, unique)
    return None


def init_flags(message: bytes | memoryview, header_size: int) -> int:
    """The flags of an INIT request (header_size 40) or reply (16)."""
    return _INIT_FLAGS.unpack_from(message, header_size)[3]


def init_reply_for_kernel(request: bytes, reply: bytes | memoryview) -> bytes:
    """The service's INIT reply with what the holder adds if the kernel offers it (libfuse, as
    pyfuse3 drives it, does not ask): FUSE_CACHE_SYMLINKS (a symlink's target never changes, and
    overlayfs reads each it walks through) and FUSE_PARALLEL_DIROPS (lookups and listings of one
    directory need not wait for one another: the service answers requests concurrently and
    changes nothing)."""
    out = bytearray(reply)
    if len(out) >= _OUT_HEADER.size + _INIT_FLAGS.size and not _OUT_HEADER.unpack_from(out)[1]:
        offered = init_flags(request, _IN_HEADER_SIZE)
        major, minor, readahead, flags = _INIT_FLAGS.unpack_from(out, _OUT_HEADER.size)
        _INIT_FLAGS.pack_into(out, _OUT_HEADER.size, major, minor, readahead,
                              flags | (offered & _ADDED_FLAGS))
    return bytes(out)


class OpenSkipper:
    """Zero-message opens: ENOSYS to the first OPEN (OPENDIR) tells a kernel that offers
    FUSE_NO_OPEN_SUPPORT (FUSE_NO_OPENDIR_SUPPORT) in its INIT that files (directories) need no
    open message; it then sends no OPEN or RELEASE (OPENDIR, RELEASEDIR) again, keeps a file's
    pages across opens and caches a directory's listing (FOPEN_KEEP_CACHE, FOPEN_CACHE_DIR: its
    defaults for such opens), and its READ and READDIR carry the file handle 0. The kernel keeps
    that choice for the connection, so it holds across service restarts."""

    def __init__(self) -> None:
        self.files = self.dirs = False

    def negotiated(self, init_request: bytes) -> None:
        offered = init_flags(init_request, _IN_HEADER_SIZE)
        self.files = bool(offered & _NO_OPEN_SUPPORT)
        self.dirs = bool(offered & _NO_OPENDIR_SUPPORT)

    def reply(self, opcode: int, unique: int) -> bytes | None:
        """ENOSYS for an OPEN or OPENDIR the kernel can do without; None otherwise."""
        if (opcode == _FUSE_OPEN and self.files) or (opcode == _FUSE_OPENDIR and self.dirs):
            return _OUT_HEADER.pack(_OUT_HEADER.size, -errno.ENOSYS, unique)
        return None

    @staticmethod
    def fill_handle(message: bytearray | memoryview, opcode: int, nodeid: int) -> None:
        """A READ or READDIR of a file opened without a message carries the handle 0: put the node
        ID there, the handle the service's open and opendir give (fs/layer_fs.py)."""
        if opcode in (_FUSE_READ, _FUSE_READDIR, _FUSE_READDIRPLUS) and \
                len(message) >= _IN_HEADER_SIZE + _FH.size and not _FH.unpack_from(message, _IN_HEADER_SIZE)[0]:
            _FH.pack_into(message, _IN_HEADER_SIZE, nodeid)


class Notifier:
    """Writes notifications to the kernel in the order they came, from a thread of its own, so that
    a notification the kernel makes wait (for a directory's lock) never holds up the relay."""

    def __init__(self) -> None:
        self._queue: deque[tuple[bytes, tuple[int, ...]]] = deque()
        self._ready = threading.Condition()
        threading.Thread(target=self._run, name="notifier", daemon=True).start()

    def send(self, message: bytes, fds: tuple[int, ...]) -> None:
        with self._ready:
            self._queue.append((message, fds))
            self._ready.notify()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                message, fds = self._queue[0]
            for fd in fds:
                write_to_kernel(fd, message)
            with self._ready:
                self._queue.popleft()


def write_to_kernel(fd: int, message: bytes | bytearray | memoryview) -> None:
    try:
        os.write(fd, message)
    except OSError as e:
        # ENOENT: the kernel gave the request up (interrupted), or a notification it had
        # nothing to do for; either way nothing is owed to anyone.
        if e.errno != errno.ENOENT:
            log.warning("writing a reply to the kernel failed: %s", e)


class Holder:
    """The FUSE connections of the mount and the plain mount, relayed to whichever service process
    is attached."""

    def __init__(self, fuse_fd: int, listener: socket.socket, mountpoint: str, service_pid_file: Path,
                 plain_fd: int, plain_mountpoint: str) -> None:
        self.fuse_fd = fuse_fd
        self.plain_fd = plain_fd                   # the plain mount's connection (no xattrs asked)
        self.service_pid_file = service_pid_file    # a service that stops removes it, a killed one cannot
        for fd in (fuse_fd, plain_fd):
            os.set_blocking(fd, False)             # read until EAGAIN, then poll again
        self.listener = listener
        self.mountpoint = mountpoint
        self.plain_mountpoint = plain_mountpoint
        self.plain_init: bytes | None = None       # the plain mount's INIT, until the first is answered
        self.init_request: bytes | None = None     # the kernel's INIT, replayed to every new service
        self.init_reply: bytes | None = None       # the first service's answer (what the kernel knows)
        # unique -> a request relayed and not answered yet, and when it was first relayed (monotonic)
        self.pending: dict[int, tuple[bytes, float]] = {}
        self.service_seconds: dict[int, float] = {}   # opcode -> seconds its requests waited for replies
        self.service: socket.socket | None = None
        self.service_pid = 0
        self.outbox: deque[bytes] = deque()        # requests for the service its socket had no room for
        self.swallow: int | None = None            # unique of a replayed INIT: its reply is not the kernel's
        self.relayed = 0                           # replies relayed to the kernel
        self.answered = 0                          # requests answered here (overlay_xattr_reply, opens)
        self.opcodes: dict[int, list[int]] = {}    # opcode -> [relayed to the service, answered here]
        self.opens = OpenSkipper()
        self.reads = ServedReads()                 # layers whose READs are answered here
        self.notifier = Notifier()                 # the service's notifications, on their way to the kernel
        self._in = bytearray(MAX_MESSAGE)
        self._out = bytearray(MAX_MESSAGE)
        self._poll = select.poll()
        self._running = True
        self.relaunch: list[str] = []               # the attached service's command line
        self.leaving_pid = 0                        # a service that said it detaches on purpose
        self._last_relaunch = -RELAUNCH_SECONDS
        self._relaunched = False                    # a service was started and has not attached yet
        self._launcher: subprocess.Popen[bytes] | None = None

    # -- control ---------------------------------------------------------------

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(_CONTROL_TIMEOUT)
        fds: list[int] = []
        try:
            raw, fds, _, _ = socket.recv_fds(conn, 4096, 3)
            request = json.loads(raw or b"{}")
            op = request.get("op")
        except (OSError, ValueError, AttributeError):
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        if op == "serve":
            with conn:
                self._serve_reads(conn, request, fds)
            return
        for fd in fds:
            os.close(fd)
        if op == "attach":
            argv = request.get("relaunch")
            self._attach(conn, [str(a) for a in argv] if isinstance(argv, list) else [])
            return
        with conn:
            if op == "status":
                reply = {"ok": True, "pid": os.getpid(), "rss_bytes": rss_bytes(),
                         "attached": self.service is not None, "service_pid": self.service_pid,
                         "waiting": len(self.pending), "relayed": self.relayed, "answered": self.answered,
                         "notifications_waiting": self.notifier.waiting,
                         "served_layers": len(self.reads), "reads_answered": self.reads.answered,
                         "read_bytes_answered": self.reads.bytes,
                         "opcodes": {str(k): v for k, v in sorted(self.opcodes.items())},
                         "service_seconds": {str(k): round(v, 6) for k, v in sorted(self.service_seconds.items())},
                         "mountpoint": self.mountpoint, "plain_mountpoint": self.plain_mountpoint}
            elif op == "stop":
                reply = {"ok": True}
                self._running = False
            elif op == "withdraw":
                slot = request.get("slot")
                reply = {"ok": True, "served": self.reads.withdraw(slot)} if isinstance(slot, int) else \
                    {"ok": False, "error": "withdraw needs a slot number"}
            elif op == "leaving":
                pid = request.get("pid")
                if isinstance(pid, int):
                    self.leaving_pid = pid
                reply = {"ok": True} if isinstance(pid, int) else {"ok": False, "error": "leaving needs a pid"}
            else:
                reply = {"ok": False, "error": f"unknown request {op!r}"}
            try:
                conn.send(json.dumps(reply).encode())
            except OSError:
                pass

    def _serve_reads(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        """Take a layer's READs over, if the attached service itself hands them (a service that
        has gone, or another process, is refused: what it vouches for may be out of date)."""
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        slot = request.get("slot")
        if self.service is None or pid != self.service_pid or len(fds) != 3 or not isinstance(slot, int):
            for fd in fds:
                os.close(fd)
            reply = {"ok": False, "error": "only the attached service hands READs over, with three descriptors"}
        else:
            try:
                self.reads.serve(slot, fds[0], fds[1], fds[2])
                reply = {"ok": True}
            except OSError as e:
                reply = {"ok": False, "error": str(e)}
            finally:
                os.close(fds[1])
                os.close(fds[2])
        try:
            conn.send(json.dumps(reply).encode())
        except OSError:
            pass

    def _attach(self, conn: socket.socket, relaunch: list[str]) -> None:
        while self.service is not None and self._one_from_service():
            pass      # the previous service may be gone with its end-of-file not read yet: read it now
        if self.service is not None:
            with conn:
                conn.send(json.dumps({"ok": False, "error": f"a service (pid {self.service_pid}) is "
                                                            f"attached already"}).encode())
            return
        set_channel_buffers(conn)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        resumed = self.init_reply is not None
        conn.send(json.dumps({"ok": True, "resumed": resumed, "pid": os.getpid(),
                              "waiting": len(self.pending)}).encode())
        conn.setblocking(False)
        self.service, self.service_pid = conn, pid
        self.relaunch = relaunch
        self._relaunched = False
        if resumed:
            assert self.init_request is not None
            self.swallow = _IN_HEADER.unpack_from(self.init_request)[2]
            self.outbox.append(self.init_request)
        self.outbox.extend(self.pending[u][0] for u in sorted(self.pending))
        log.info("service pid %d attached (%s, %d request(s) handed over)", pid,
                 "resumed" if resumed else "new session", len(self.pending))
        self._poll.register(conn, select.POLLIN)
        self._flush()

    def _detach(self) -> None:
        assert self.service is not None
        on_purpose = not self._lost()
        log.info("service pid %d %s; %d request(s) wait for the next one", self.service_pid,
                 "detached" if on_purpose else "was lost", len(self.pending))
        self._poll.unregister(self.service)
        self.service.close()
        self.service, self.service_pid = None, 0
        self.reads.clear()            # the next service hands over what it finds complete
        self.outbox.clear()
        self.swallow = None
        for fd in (self.fuse_fd, self.plain_fd):
            self._poll.modify(fd, 0)            # requests now wait in the kernel's queue
        if not on_purpose:
            self._start_service()

    def _lost(self) -> bool:
        """The attached service went without meaning to: it did not say `leaving` and its pid file
        still names it (a `leaving` the holder gave up waiting for does not make a stop a loss)."""
        if self.service_pid == self.leaving_pid:
            return False
        try:
            return int(self.service_pid_file.read_text().strip()) == self.service_pid
        except (OSError, ValueError):
            return False

    def _start_service(self) -> None:
        """Start a service after one was lost, unless the last one started never attached."""
        now = time.monotonic()
        if not self.relaunch or (self._relaunched and now - self._last_relaunch < RELAUNCH_SECONDS):
            return
        self._last_relaunch, self._relaunched = now, True
        log.info("starting the service again")
        try:   # the launcher detaches the service and exits; it is reaped in run()
            self._launcher = subprocess.Popen(self.relaunch, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                              preexec_fn=_killable)
        except OSError as e:
            log.error("cannot start the service: %s", e)

    # -- relay -----------------------------------------------------------------

    def _flush(self) -> None:
        """Send queued requests to the service while its socket takes them."""
        assert self.service is not None
        while self.outbox:
            try:
                self.service.send(self.outbox[0])
            except BlockingIOError:
                break
            except OSError:
                self._detach()
                return
            self.outbox.popleft()
        self._poll.modify(self.service, select.POLLIN | (select.POLLOUT if self.outbox else 0))
        for fd in (self.fuse_fd, self.plain_fd):
            self._poll.modify(fd, 0 if self.outbox else select.POLLIN)

    def _from_kernel(self, fd: int) -> None:
        """Relay what the kernel has queued on one connection, a batch at most (one poll per batch,
        not per message)."""
        for _ in range(_BATCH):
            if self.service is None or self.outbox or not self._running or not self._one_from_kernel(fd):
                return

    def _from_service(self) -> None:
        for _ in range(_BATCH):
            if self.service is None or not self._one_from_service():
                return

    def _one_from_kernel(self, fd: int) -> bool:
        try:
            n = os.readv(fd, [self._in])
        except OSError as e:
            if e.errno in (errno.EINTR, errno.ENOENT):
                return True
            if e.errno == errno.EAGAIN:
                return False
            if e.errno == errno.ENODEV:       # unmounted
                log.info("the mount is gone; the holder ends")
                self._running = False
                return False
            raise
        _, opcode, unique, nodeid = _IN_HEADER.unpack_from(self._in)
        plain = fd == self.plain_fd
        if plain:
            if opcode == _FUSE_INIT:
                self.plain_init = bytes(memoryview(self._in)[:n])
                self._answer_plain_init()
                return True
            if nodeid == _ROOT_ID:        # the service tells the plain mount's root by its own ID
                nodeid = PLAIN_ROOT
                _Q.pack_into(self._in, _NODEID_AT, nodeid)
            reply = plain_reply(opcode, unique)
        else:
            reply = overlay_xattr_reply(self._in[:n]) if opcode == _FUSE_GETXATTR else None
        if reply is None:
            reply = self.opens.reply(opcode, unique)
        if reply is None and self.reads and (
                (opcode == _FUSE_READ and self.reads.answer(fd, self._in, nodeid, unique)) or
                (opcode == _FUSE_LOOKUP and self.reads.answer_lookup(fd, self._in, n, nodeid, unique)) or
                (opcode == _FUSE_GETXATTR and self.reads.answer_getxattr(fd, self._in, n, nodeid, unique)) or
                (opcode in _LISTINGS and self.reads.answer_readdir_end(fd, self._in, nodeid, unique))):
            self.answered += 1
            self.opcodes.setdefault(opcode, [0, 0])[1] += 1
            return True
        counts = self.opcodes.get(opcode)
        if counts is None:
            counts = self.opcodes[opcode] = [0, 0]
        if reply is not None:
            self.answered += 1
            counts[1] += 1
            self._to_kernel(reply, fd)
            return True
        counts[0] += 1
        self.opens.fill_handle(self._in, opcode, nodeid)
        if plain:
            unique |= PLAIN_TAG
            _Q.pack_into(self._in, _UNIQUE_AT, unique)
            if opcode == _FUSE_INTERRUPT and n >= _IN_HEADER_SIZE + 8:   # the request it interrupts
                _Q.pack_into(self._in, _IN_HEADER_SIZE, _Q.unpack_from(self._in, _IN_HEADER_SIZE)[0] | PLAIN_TAG)
        message = bytes(memoryview(self._in)[:n])
        if opcode == _FUSE_INIT and self.init_request is None:
            self.init_request = message
            self.opens.negotiated(message)
        if opcode not in _NO_REPLY:
            self.pending[unique] = (message, time.monotonic())
        self.outbox.append(message)
        self._flush()
        return True

    def _one_from_service(self) -> bool:
        assert self.service is not None
        try:
            n = self.service.recv_into(self._out)
        except BlockingIOError:
            return False
        except OSError:
            n = 0
        if n < _OUT_HEADER.size:
            self._detach()
            return False
        view = memoryview(self._out)[:n]
        _, _, unique = _OUT_HEADER.unpack_from(view)
        if unique and unique == self.swallow:
            self.swallow = None
            if self.init_reply is not None and self.init_request is not None and \
                    init_reply_for_kernel(self.init_request, view)[8:] != self.init_reply[8:]:
                log.warning("the new service negotiated other FUSE parameters; the kernel keeps the first")
            return True
        if not unique:          # a notification (an entry to forget): the same node IDs in both mounts
            self.relayed += 1
            self.notifier.send(bytes(view), (self.fuse_fd, self.plain_fd))
            return True
        request, sent = self.pending.pop(unique, (None, 0.0))
        op = _IN_HEADER.unpack_from(request)[1] if request is not None else None
        if op is not None:
            self.service_seconds[op] = self.service_seconds.get(op, 0.0) + time.monotonic() - sent
        first_init = op == _FUSE_INIT and self.init_reply is None
        if first_init:
            assert request is not None
            self.init_reply = init_reply_for_kernel(request, view)
            log.info("FUSE INIT: the kernel offers flags %#x, the service asks %#x, the kernel gets %#x "
                     "(max_readahead, max_background, congestion_threshold, max_write: %s)",
                     init_flags(request, _IN_HEADER_SIZE), init_flags(view, _OUT_HEADER.size),
                     init_flags(self.init_reply, _OUT_HEADER.size),
                     struct.unpack_from("<I4xHHI", self.init_reply, _OUT_HEADER.size + 8)
                     if len(self.init_reply) >= _OUT_HEADER.size + 20 else "?")
            view = memoryview(self.init_reply)
        self.relayed += 1
        if unique & PLAIN_TAG:
            _Q.pack_into(self._out, _UNIQUE_AT, unique & ~PLAIN_TAG)
            self._to_kernel(view, self.plain_fd)
        else:
            self._to_kernel(view)
        if first_init:
            set_read_ahead(self.mountpoint, READ_AHEAD_KIB)
            self._answer_plain_init()
        return True

    def _answer_plain_init(self) -> None:
        """Answer the plain mount's INIT with the first connection's reply, once there is one (the
        kernel offers both connections the same)."""
        if self.plain_init is None or self.init_reply is None:
            return
        reply = bytearray(self.init_reply)
        _Q.pack_into(reply, _UNIQUE_AT, _IN_HEADER.unpack_from(self.plain_init)[2])
        self.plain_init = None
        self._to_kernel(reply, self.plain_fd)
        set_read_ahead(self.plain_mountpoint, READ_AHEAD_KIB)

    def _to_kernel(self, reply: bytes | bytearray | memoryview, fd: int | None = None) -> None:
        write_to_kernel(self.fuse_fd if fd is None else fd, reply)

    def run(self) -> None:
        self._poll.register(self.listener, select.POLLIN)
        for fd in (self.fuse_fd, self.plain_fd):
            self._poll.register(fd, 0)           # POLLERR alone: the mount went away
        while self._running:
            if self._launcher is not None and self._launcher.poll() is not None:
                self._launcher = None
            for fd, events in self._poll.poll(None if self._launcher is None else 100):
                if fd == self.listener.fileno():
                    self._accept()
                elif fd in (self.fuse_fd, self.plain_fd):
                    if events & (select.POLLERR | select.POLLHUP) and not events & select.POLLIN:
                        log.info("a FUSE connection ended; the holder ends")
                        self._running = False
                    elif self.service is not None and not self.outbox:
                        self._from_kernel(fd)
                elif self.service is not None and fd == self.service.fileno():
                    if events & select.POLLIN:
                        self._from_service()
                    if self.service is not None and events & select.POLLOUT:
                        self._flush()
                    elif self.service is not None and events & (select.POLLHUP | select.POLLERR) \
                            and not events & select.POLLIN:
                        self._detach()
                if not self._running:
                    break

    def close(self) -> None:
        """Detach the mount and drop the connection (containers on it then get errors).

        A service still attached is not started again: the holder is going, and a service
        started now would launch a new holder and mount again behind `service stop`."""
        self.relaunch = []
        if self.service is not None:
            self._detach()
        for mountpoint, fd in ((self.plain_mountpoint, self.plain_fd), (self.mountpoint, self.fuse_fd)):
            try:
                libc.umount2(mountpoint, _MNT_DETACH)
            except OSError as e:
                if e.errno != errno.EINVAL:     # not mounted any more
                    log.warning("detaching %s failed: %s", mountpoint, e)
            os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lazyoci-holder")
    parser.add_argument("--service-dir", type=Path, required=True)
    parser.add_argument("--foreground", action="store_true")
    args = parser.parse_args(argv)
    service_dir: Path = args.service_dir.absolute()
    pid_fd = os.open(service_dir / "holder.pid", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(pid_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return        # one holder per data root: it is running
    logging.basicConfig(filename=None if args.foreground else os.fspath(service_dir / "holder.log"),
                        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mountpoint = os.fspath(service_dir / "mnt")
    plain_mountpoint = os.fspath(service_dir / "mnt-plain")
    try:       # the holder's own: `mnt` is the service's (service/paths.py), made before it starts the holder
        os.mkdir(plain_mountpoint, 0o700)
    except FileExistsError:
        pass   # also a dead mount of a killed holder, which mount_fuse detaches
    sock_path = service_dir / "holder.sock"
    sock_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dfd = os.open(service_dir, os.O_RDONLY | os.O_DIRECTORY)    # long data roots: bind through the fd
    old = os.umask(0o177)
    try:
        listener.bind(f"/proc/self/fd/{dfd}/{sock_path.name}")
    finally:
        os.umask(old)
        os.close(dfd)
    listener.listen(16)
    fuse_fd = mount_fuse(mountpoint)
    try:
        plain_fd = mount_fuse(plain_mountpoint)
    except BaseException:
        libc.umount2(mountpoint, _MNT_DETACH)
        os.close(fuse_fd)
        raise
    (service_dir / "holder.lost").unlink(missing_ok=True)
    if not args.foreground:
        daemonize(service_dir / "holder.log")
    _set_oom_score_adj(-1000)          # holding every mount, it must be the last the kernel kills
    os.ftruncate(pid_fd, 0)
    os.write(pid_fd, f"{os.getpid()}\n".encode())
    log.info("holder ready (pid %d), mount %s", os.getpid(), mountpoint)
    holder = Holder(fuse_fd, listener, mountpoint, service_dir / "lazyoci.pid", plain_fd, plain_mountpoint)
    try:
        holder.run()
    except Exception:
        log.exception("holder failed")
        sys.exit(1)
    finally:
        holder.close()
        listener.close()
        sock_path.unlink(missing_ok=True)
        log.info("holder stopped")


if __name__ == "__main__":
    main()
