"""The lazyoci service: a daemon hosting the FUSE mount of lazy layers and a control socket.

Run as `python -m lazyoci.service.daemon --root R [--config C]`; it detaches
(double fork + setsid, so neither the CLI nor a test runner ever has to reap it),
writes its pid file and logs under <root>/service/, mounts again the layers
recorded by its previous run, takes over the FUSE session of the holder
(service/session_holder.py, started here if none runs: it owns the mount, so
the session outlives this process), and only then listens on the control socket
— so a client that can connect can use it.
Beside it, containerd's Snapshots gRPC service listens on <root>/service/snapshotter.sock
(lazyoci.containerd.server, in gRPC's own threads); if it cannot start, the service
goes on without it and its log says why. It starts (a quarter of a second of CPU) in a thread
while the holder starts and the recorded layers are mounted; the control socket listens once
it is up.

Control protocol: one JSON object per line in, one JSON object per line out.
    {"op": "ping"}                                   -> {"ok": true, "pid": N, "mountpoint": ...}
    {"op": "mount_layer", "ref", "layer_digest", "ztoc_digest"} -> {"ok": true, "path": ...}
    {"op": "unmount_layer", "layer_digest", "ztoc_digest"} -> {"ok": true, "unmounted": bool}
    {"op": "status"}                                 -> {"ok": true, "layers": [...], "rss_bytes": N,
                                                         "containerd_socket": path or null, "session": ...}
    {"op": "read_order"}                             -> {"ok": true, "views": [[layer, ztoc, [span, ...],
                                                                    [[start, end], ...]], ...]}
    {"op": "pull", "ref", ...}                       -> a conversation: progress lines, then the end
                                                        (`lazyoci pull` run here: service/pull_requests.py)
    {"op": "shutdown"}                               -> {"ok": true}; then answers what it has and exits
    {"op": "hand_over"}                              -> {"ok": true}; then exits at once, leaving the
                                                        requests it had not answered to the next service
Errors: {"ok": false, "error": message, "type": LazyociError subclass name, "fields": its fields}
(service/error_wire.py).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyfuse3
import trio

from lazyoci import libc
from lazyoci.config import Config, load_config
from lazyoci.errors import LazyociError, ServiceError
from lazyoci.fs.layer_fs import LayerFS
from lazyoci.fs.span_fetcher import flush_cache_writes
from lazyoci.service.process import daemonize, rss_bytes
from lazyoci.service.error_wire import error_reply
from lazyoci.service.holder_link import (Attachment, HolderPaths, attach, launch_holder, record_lost,
                                         read_takeover, say_leaving, write_takeover)
from lazyoci.service.layers import LayerManager
from lazyoci.service.paths import ServicePaths, socket_address
from lazyoci.store.layout import DataRoot

if TYPE_CHECKING:
    from lazyoci.containerd.server import SnapshotterServer
    from lazyoci.service.pull_runner import PullSession

log = logging.getLogger("lazyoci.service")
MAX_REQUEST = 1 << 20
_DRAIN_QUIET_SECONDS = 0.3     # at shutdown: FUSE answered until no fetch was refused for this long
_DRAIN_MAX_SECONDS = 10.0      # ... but no longer than this (a fetch waiting for headers ends within
                               # one soci.fetch_rate_window_seconds)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MALLOC_KEEP = 64 << 20


def _tune_malloc() -> None:
    """Keep span-sized buffers in the heap instead of a fresh mmap each time.

    Every fetched span allocates several 4 MiB buffers (inflate output, bytes copies); above
    glibc's mmap threshold each is a new mapping whose pages fault in and are zeroed, then
    unmapped again. Measured on python-ml's `import torch` (100 MB/s + 20 ms): service CPU
    8.1-8.8 s -> 6.6-6.8 s, run->ready 10.1/11.9 s -> 9.2/9.1 s, peak RSS +10-15 MiB."""
    libc.mallopt(_M_MMAP_THRESHOLD, _MALLOC_KEEP)     # not glibc: its allocator's defaults then
    libc.mallopt(_M_TRIM_THRESHOLD, _MALLOC_KEEP)


class Service:
    """One daemon: the FUSE session, the layers, the control server."""

    def __init__(self, root: DataRoot, config: Config, relaunch: list[str]) -> None:
        self.root = root
        self.paths = ServicePaths(root)
        self.config = config
        self.fs = LayerFS()
        self.layers: LayerManager | None = None
        self.containerd: SnapshotterServer | None = None    # containerd's snapshotter service, once serving
        self.holder = HolderPaths(self.paths.dir)
        self.relaunch = relaunch        # how the holder starts a service again if this one is lost
        self.attachment: Attachment | None = None
        self.started = time.monotonic()  # when this process may serve (`run` counts from here)
        self.serving_after = 0.0        # seconds from then to serving the FUSE session
        self._stopping = False
        self._cancel = trio.CancelScope()
        self._holder_launch: threading.Thread | None = None
        self._holder_error: BaseException | None = None
        self._containerd_start: threading.Thread | None = None
        self.pulls: set[PullSession] = set()      # pulls run for CLIs (`lazyoci pull`), under way
        self._trio_token: trio.lowlevel.TrioToken | None = None     # for worker threads, once serving

    @property
    def running_layers(self) -> LayerManager:
        """The layer manager, which exists from `prepare` on."""
        if self.layers is None:
            raise ServiceError("the service's layers are not set up yet")
        return self.layers

    def prepare(self, containerd: bool = True) -> None:
        """Mount the recorded layers: the slow part of a start, which a process that is to take
        over from a running service does while that one still serves (`containerd=False`: its
        snapshotter socket is the running one's until then)."""
        self.paths.ensure()
        # the holder (a process of its own) and containerd's service start while this one mounts
        self._holder_launch = threading.Thread(target=self._launch_holder, name="holder-launch", daemon=True)
        self._holder_launch.start()
        load_request_code()       # before any thread that imports starts (the holder's imports nothing)
        # a service that records reads (`soci optimize`) hands none to the holder and unpacks no
        # layer for containers: either would take reads away from the record
        records = self.paths.records_reads.exists()
        self.layers = LayerManager(self.root, self.config, self.fs, None if records else self.holder,
                                   unpack_complete=self.config.soci.unpack_complete_layers and not records,
                                   record_reads=records, parse_helper=True)
        if containerd:
            self.start_containerd()
        self.layers.remount_known()

    def start_containerd(self) -> None:
        """Start containerd's snapshotter service in a thread of its own (once); the control
        socket listens after it is up."""
        if self._containerd_start is None:
            self._containerd_start = threading.Thread(target=self._start_containerd, name="containerd-start",
                                                      daemon=True)
            self._containerd_start.start()

    def _launch_holder(self) -> None:
        try:
            launch_holder(self.holder)
        except BaseException as e:     # raised by run()
            self._holder_error = e

    def run(self) -> None:
        """Serve: take the holder's FUSE session over, then the control socket. `prepare` first."""
        layers = self.running_layers
        self.start_containerd()
        # Every recorded layer before the session: its first request may name any of them
        # (again, for a layer the previous process mounted after `prepare`; the others are kept).
        layers.remount_known()
        if self._holder_launch is not None:
            self._holder_launch.join()
        if self._holder_error is not None:
            self._stop_containerd()
            raise self._holder_error
        launch_holder(self.holder)       # (none started by prepare, or it is gone since: start one)
        self.attachment = attach(self.holder, self.relaunch)
        if layers.holder_offers is not None:
            layers.holder_offers.attached()     # mounted views: the holder answers what READs it can
        # The holder mounted (ro, no allow_other: root alone, service/paths.py); libfuse serves its channel.
        options = set(pyfuse3.default_options) | {"fsname=lazyoci", "subtype=lazyoci", "ro"}
        pyfuse3.init(self.fs, f"/dev/fd/{self.attachment.fd}", options)
        self.serving_after = time.monotonic() - self.started
        log.info("serving the %s FUSE session of holder pid %d (%d request(s) handed over) %.3fs after it "
                 "could",
                 "resumed" if self.attachment.resumed else "new", self.attachment.holder_pid,
                 self.attachment.waiting, self.serving_after)
        try:
            trio.run(self._main)
        finally:
            self._stop_containerd()
            pyfuse3.close(unmount=False)      # the mount is the holder's
            layers.close()
            log.info("service stopped")

    async def _main(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fuse_main)
            self.running_layers.start_background()
            with self._cancel:
                await self._serve()

    async def _fuse_main(self) -> None:
        """Serve FUSE until told to stop; the channel closing under us means the holder died."""
        try:
            await pyfuse3.main()
        except Exception as e:
            if not self._stopping:
                log.error("the FUSE channel failed: %s", e)
        if not self._stopping:
            pid = self.attachment.holder_pid if self.attachment else 0
            log.error("the FUSE session holder (pid %d) is gone: its mount is lost, readers get errors; "
                      "the service stops (the next start mounts afresh)", pid)
            record_lost(self.holder, pid)
            self._cancel.cancel()

    async def _serve(self) -> None:
        sock_path = self.paths.socket
        sock_path.unlink(missing_ok=True)
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        addr, dfd = socket_address(sock_path)
        old = os.umask(0o177)
        try:
            await listener.bind(addr)
        finally:
            os.umask(old)
            if dfd is not None:
                os.close(dfd)
        os.chmod(sock_path, 0o600)
        listener.listen(64)
        if self._containerd_start is not None:
            await trio.to_thread.run_sync(self._containerd_start.join)
        log.info("service ready (pid %d), mount %s, socket %s", os.getpid(), self.paths.mountpoint, sock_path)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._handle, conn)
        finally:
            listener.close()
            sock_path.unlink(missing_ok=True)

    def _stop_containerd(self) -> None:
        if self._containerd_start is not None:
            self._containerd_start.join()
        if self.containerd is not None:
            self.containerd.stop()

    def _start_containerd(self) -> None:
        try:
            from lazyoci.containerd.server import SnapshotterServer

            layers = self.running_layers
            server = SnapshotterServer(self.root, self.config, layers, layers.client)
            server.start()
        except Exception as e:     # e.g. a build without the generated API: FUSE still serves
            log.error("containerd's snapshotter service did not start: %s", e)
            return
        self.containerd = server

    async def _handle(self, conn: trio.socket.SocketType) -> None:
        with conn:
            buf = b""
            while b"\n" not in buf and len(buf) < MAX_REQUEST:
                chunk = await conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
            try:
                request = json.loads(buf.split(b"\n", 1)[0] or b"{}")
                if isinstance(request, dict) and request.get("op") == "pull" and not self._stopping:
                    await self._pull(conn, request, buf.split(b"\n", 1)[1] if b"\n" in buf else b"")
                    return
                reply = await self._dispatch(request)
            except LazyociError as e:
                reply = error_reply(e)
            except (ValueError, KeyError, TypeError) as e:
                reply = {"ok": False, "error": f"bad request: {e}", "type": "LazyociError"}
            except Exception as e:   # a bug: keep serving, but say so
                log.exception("control request failed")
                reply = {"ok": False, "error": f"internal error: {e}", "type": "LazyociError"}
            out = memoryview(json.dumps(reply).encode() + b"\n")
            try:
                while out:
                    out = out[await conn.send(out):]
            except OSError:
                pass
            op = request_op(buf)
            if op == "shutdown":
                await self._shutdown()
            elif op == "hand_over":
                self._hand_over()

    async def _pull(self, conn: trio.socket.SocketType, request: dict, leftover: bytes) -> None:
        """Run `lazyoci pull` for the CLI on this connection (service/pull_runner.py), in a worker
        thread that talks over the connection itself until the pull has ended."""
        from lazyoci.service.pull_runner import PullSession, ServiceLayers

        sock = socket.socket(fileno=conn.detach())
        sock.setblocking(True)
        session = PullSession(sock, leftover, request, self.root, self.config,
                              ServiceLayers(self.running_layers, self.paths, self.unmount_view))
        self.pulls.add(session)
        try:
            # a limiter of its own: a pull holds its thread throughout, FUSE's reads must never wait for one
            await trio.to_thread.run_sync(session.run, limiter=trio.CapacityLimiter(1))
        finally:
            self.pulls.discard(session)

    def unmount_view(self, layer_digest: str, index_digest: str) -> bool:
        """Stop serving a view, unless containerd's snapshots stand on it; True if it was unmounted.
        Called in worker threads."""
        if self.containerd is not None and self.containerd.uses_view(layer_digest, index_digest):
            return False
        name = self.paths.view_dir(layer_digest, index_digest).name.encode()
        done = self.running_layers.unmount(layer_digest, index_digest)
        if done:
            trio.from_thread.run_sync(_forget_entry, name, trio_token=self._trio_token)
        return done

    async def _dispatch(self, req: dict) -> dict:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "mountpoint": os.fspath(self.paths.mountpoint)}
        if op == "mount_layer":
            await trio.to_thread.run_sync(self.running_layers.mount, req["ref"], req["layer_digest"], req["ztoc_digest"])
            return {"ok": True, "path": os.fspath(self.paths.view_dir(req["layer_digest"], req["ztoc_digest"]))}
        if op == "unmount_layer":
            done = await trio.to_thread.run_sync(self.unmount_view, req["layer_digest"], req["ztoc_digest"])
            return {"ok": True, "unmounted": done}
        if op == "status":
            layers = self.running_layers
            a = self.attachment
            return {"ok": True, "pid": os.getpid(), "rss_bytes": rss_bytes(),
                    "session": {"holder_pid": a.holder_pid if a else 0, "resumed": a.resumed if a else False,
                                "handed_over": a.waiting if a else 0,
                                "serving_after_seconds": round(self.serving_after, 3)},
                    "mountpoint": os.fspath(self.paths.mountpoint),
                    "cache_bytes": layers.cache.total_bytes,
                    "cache_max_bytes": layers.cache.max_bytes,
                    "background_fetch": layers.background is not None,
                    "containerd_socket": os.fspath(self.containerd.socket) if self.containerd else None,
                    "layers": [s.to_json() for s in layers.status()]}
        if op == "read_order":       # the spans reads touched, for `lazyoci soci optimize`
            return {"ok": True, "views": [[l, z, spans, [list(r) for r in ranges]]
                                          for l, z, spans, ranges in self.running_layers.read_order()]}
        if op in ("shutdown", "hand_over"):
            return {"ok": True}
        raise LazyociError(f"unknown request {op!r}")

    async def _shutdown(self) -> None:
        """Stop in seconds even while reads wait on a stalled registry: cancelling the registry
        client first makes every fetch in flight fail, so the FUSE requests waiting on them are
        answered with EIO and the FUSE loop, which waits for its requests, can end.

        The loop goes on answering until no fetch is under way and none has been turned away
        for a moment: a reader whose read failed asks the kernel again, and that request too
        gets EIO, not ENOTCONN from a session that is gone. Pulls run for CLIs are cancelled
        and roll back meanwhile (their CLIs print the error)."""
        log.info("shutdown requested")
        self._stopping = True
        for pull in list(self.pulls):       # they roll back; the connections' tasks wait for them
            pull.cancel()
        await trio.to_thread.run_sync(say_leaving, self.holder)
        client = self.running_layers.client
        client.cancel()
        give_up = time.monotonic() + _DRAIN_MAX_SECONDS
        # (a cancelled pull rolls back first: it may still look into the mount)
        while time.monotonic() < give_up and (self.pulls or client.transfers_in_flight or
                                              time.monotonic() - client.last_refusal < _DRAIN_QUIET_SECONDS):
            await trio.sleep(0.05)
        pyfuse3.terminate()
        self._cancel.cancel()

    def _hand_over(self) -> None:
        """Leave the FUSE session to the next service process: exit now, answering nothing more.

        Whatever this process took from the kernel and did not answer, the holder sends
        the next one (a crash is the same to the holder); spans on their way to the disk
        cache are written first, so the next process finds them."""
        log.info("handing the FUSE session over to the next service process")
        self._stopping = True
        say_leaving(self.holder)
        flush_cache_writes()
        logging.shutdown()
        os._exit(0)


def load_request_code() -> None:
    """Import what the control requests run in worker threads (a pull for the CLI, a layer's
    mount) while this process has no other thread.

    Two threads importing for the first time a package and one of its submodules can deadlock
    (each holds the module lock the other waits for; Python raises it as a deadlock), and a pull
    imports what a mount does; loaded at start, the first pull also spends no time on imports
    between its requests (0.02-0.05 s of CPU, once per process)."""
    import lazyoci.estargz.index  # noqa: F401
    import lazyoci.estargz.remote  # noqa: F401
    import lazyoci.images.service  # noqa: F401
    import lazyoci.layer_formats  # noqa: F401
    import lazyoci.service.prefetch_records  # noqa: F401
    import lazyoci.service.pull_runner  # noqa: F401
    import lazyoci.snapshot.overlay  # noqa: F401
    import lazyoci.snapshot.own_index  # noqa: F401
    import lazyoci.snapshot.snapshotters  # noqa: F401
    import lazyoci.snapshot.soci_prefetch  # noqa: F401
    import lazyoci.snapshot.soci_pull  # noqa: F401
    import lazyoci.soci.discovery  # noqa: F401
    import lazyoci.soci.index  # noqa: F401
    import lazyoci.soci.prefetch  # noqa: F401
    import lazyoci.zstdchunked.fetch  # noqa: F401
    import lazyoci.zstdchunked.toc  # noqa: F401
    import lazyoci.ztoc  # noqa: F401
    try:
        import lazyoci.snapshot.soci  # noqa: F401
    except ImportError:      # a build without the soci snapshotter: its pulls say so
        pass


def _forget_entry(name: bytes) -> None:
    """Have the kernel forget a view's directory entry (in the loop's thread, as pyfuse3 wants)."""
    try:
        pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name, ignore_enoent=True)
    except Exception:   # the kernel may never have seen the name
        pass


def request_op(buf: bytes) -> object:
    """The `op` of a control request (None if it is not one), for what follows the reply."""
    try:
        return json.loads(buf.split(b"\n", 1)[0]).get("op")
    except (ValueError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lazyoci-service")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--foreground", action="store_true")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--take-over", action="store_true",
                        help="if a service runs, get ready beside it, then wait for it to hand over")
    args = parser.parse_args(argv)
    root = DataRoot(args.root.absolute()).ensure()
    paths = ServicePaths(root)
    paths.ensure()
    config = load_config(args.config, kept=root.config_document) if args.config else Config()
    # One service per data root: the pid file is locked BEFORE detaching (the lock belongs to the
    # open file, which the daemon inherits), so when the launcher returns a daemon holds it; a
    # second launcher (two commands starting the service at once) leaves without touching anything.
    pid_fd = os.open(paths.pid_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(pid_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        waits = False
    except BlockingIOError:
        if not args.take_over:
            return
        waits = True       # `service restart`: the running service hands over once this one is ready
    if not args.foreground:
        daemonize(paths.log_file)
    logging.basicConfig(
        filename=None if args.foreground else os.fspath(paths.log_file),
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.debug else logging.WARNING)  # one line per Range request otherwise
    _tune_malloc()
    holder = HolderPaths(paths.dir)
    try:
        relaunch = [sys.executable, "-m", "lazyoci.service.daemon", "--root", os.fspath(root.path)]
        if args.config:
            relaunch += ["--config", os.fspath(args.config.absolute())]
        if args.debug:
            relaunch.append("--debug")
        service = Service(root, config, relaunch)
        if waits:
            write_takeover(holder, os.getpid(), ready=False)
            service.prepare(containerd=False)
            write_takeover(holder, os.getpid(), ready=True)
            log.info("ready to take over (pid %d)", os.getpid())
            fcntl.flock(pid_fd, fcntl.LOCK_EX)        # until the running service has handed over
            service.started = time.monotonic()
        else:
            service.prepare()
        os.ftruncate(pid_fd, 0)
        os.write(pid_fd, f"{os.getpid()}\n".encode())
        holder.takeover_file.unlink(missing_ok=True)
        service.run()
    except LazyociError as e:
        log.error("service failed: %s", e)
        sys.exit(1)
    except Exception:
        log.exception("service crashed")
        sys.exit(1)
    finally:
        try:
            if paths.pid_file.read_text().strip() == str(os.getpid()):
                paths.pid_file.unlink()
        except OSError:
            pass
        if (read_takeover(holder) or {}).get("pid") == os.getpid():    # it never took over
            holder.takeover_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
