"""The lazyoci service: a daemon hosting the FUSE mount of lazy layers and a control socket.

Run as `python -m lazyoci.service.daemon --root R [--config C]`; it detaches
(double fork + setsid, so neither the CLI nor a test runner ever has to reap it),
writes its pid file and logs under <root>/service/, mounts the one FUSE
filesystem, mounts again the layers recorded by its previous run, and only
then listens on the control socket — so a client that can connect can use it.
Beside it, containerd's Snapshots gRPC service listens on <root>/service/snapshotter.sock
(lazyoci.containerd.server, in gRPC's own threads); if it cannot start, the service
goes on without it and its log says why.

Control protocol: one JSON object per line in, one JSON object per line out.
    {"op": "ping"}                                   -> {"ok": true, "pid": N, "mountpoint": ...}
    {"op": "mount_layer", "ref", "layer_digest", "ztoc_digest"} -> {"ok": true, "path": ...}
    {"op": "unmount_layer", "layer_digest", "ztoc_digest"} -> {"ok": true, "unmounted": bool}
    {"op": "status"}                                 -> {"ok": true, "layers": [...], "rss_bytes": N,
                                                         "containerd_socket": path or null, ...}
    {"op": "read_order"}                             -> {"ok": true, "views": [[layer, ztoc, [span, ...]], ...]}
    {"op": "shutdown"}                               -> {"ok": true}; then unmounts and exits
Errors: {"ok": false, "error": message, "type": LazyociError subclass name, "fields": its fields}
(service/error_wire.py).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyfuse3
import trio

from lazyoci import libc
from lazyoci.config import Config, load_config
from lazyoci.errors import LazyociError, ServiceError
from lazyoci.fs.layer_fs import LayerFS
from lazyoci.service.error_wire import error_reply
from lazyoci.service.layers import LayerManager
from lazyoci.service.paths import ServicePaths, socket_address
from lazyoci.store.layout import DataRoot

if TYPE_CHECKING:
    from lazyoci.containerd.server import SnapshotterServer

log = logging.getLogger("lazyoci.service")
MAX_REQUEST = 1 << 20
_DRAIN_QUIET_SECONDS = 0.3     # at shutdown: FUSE answered until no fetch was refused for this long
_DRAIN_MAX_SECONDS = 10.0      # ... but no longer than this (a fetch waiting for headers ends within
                               # one soci.fetch_rate_window_seconds)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


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


def _unmount_stale(mnt: Path) -> None:
    """A previous daemon that died leaves a dead FUSE mount ("not connected"): detach it."""
    target = os.fspath(mnt)
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == target for line in f)
    if mounted:
        log.warning("detaching a stale mount at %s", target)
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


class Service:
    """One daemon: the FUSE session, the layers, the control server."""

    def __init__(self, root: DataRoot, config: Config) -> None:
        self.root = root
        self.paths = ServicePaths(root)
        self.config = config
        self.fs = LayerFS()
        self.layers: LayerManager | None = None
        self.containerd: SnapshotterServer | None = None    # containerd's snapshotter service, once serving
        self._cancel = trio.CancelScope()

    @property
    def running_layers(self) -> LayerManager:
        """The layer manager, which exists from the start of `run` on."""
        if self.layers is None:
            raise ServiceError("the service's layers are not set up yet")
        return self.layers

    def run(self) -> None:
        self.paths.ensure()
        _unmount_stale(self.paths.mountpoint)
        self.layers = layers = LayerManager(self.root, self.config, self.fs)
        options = set(pyfuse3.default_options)
        options |= {"fsname=lazyoci", "subtype=lazyoci", "ro"}    # no allow_other: root alone (service/paths.py)
        pyfuse3.init(self.fs, os.fspath(self.paths.mountpoint), options)
        try:
            trio.run(self._main)
        finally:
            if self.containerd is not None:
                self.containerd.stop()
            pyfuse3.close(unmount=True)
            layers.close()
            log.info("service stopped")

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fuse_main)
            await trio.to_thread.run_sync(self.running_layers.remount_known)
            self.running_layers.start_background()
            with self._cancel:
                await self._serve()

    async def _fuse_main(self) -> None:
        await pyfuse3.main()

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
        log.info("service ready (pid %d), mount %s, socket %s", os.getpid(), self.paths.mountpoint, sock_path)
        await trio.to_thread.run_sync(self._start_containerd)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._handle, conn)
        finally:
            listener.close()
            sock_path.unlink(missing_ok=True)

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
            if request_is_shutdown(buf):
                await self._shutdown()

    async def _dispatch(self, req: dict) -> dict:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "mountpoint": os.fspath(self.paths.mountpoint)}
        if op == "mount_layer":
            await trio.to_thread.run_sync(self.running_layers.mount, req["ref"], req["layer_digest"], req["ztoc_digest"])
            return {"ok": True, "path": os.fspath(self.paths.layer_dir(req["layer_digest"], req["ztoc_digest"]))}
        if op == "unmount_layer":
            if self.containerd is not None and await trio.to_thread.run_sync(
                    self.containerd.uses_view, req["layer_digest"], req["ztoc_digest"]):
                return {"ok": True, "unmounted": False}     # containerd's snapshots stand on it
            name = self.paths.layer_dir(req["layer_digest"], req["ztoc_digest"]).name.encode()
            done = await trio.to_thread.run_sync(self.running_layers.unmount, req["layer_digest"], req["ztoc_digest"])
            if done:
                try:
                    pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name, ignore_enoent=True)
                except Exception:   # the kernel may never have seen the name
                    pass
            return {"ok": True, "unmounted": done}
        if op == "status":
            layers = self.running_layers
            return {"ok": True, "pid": os.getpid(), "rss_bytes": _rss_bytes(),
                    "mountpoint": os.fspath(self.paths.mountpoint),
                    "cache_bytes": layers.cache.total_bytes,
                    "cache_max_bytes": layers.cache.max_bytes,
                    "background_fetch": layers.background is not None,
                    "containerd_socket": os.fspath(self.containerd.socket) if self.containerd else None,
                    "layers": [s.to_json() for s in layers.status()]}
        if op == "read_order":       # the spans reads touched, for `lazyoci soci optimize`
            return {"ok": True, "views": [list(v) for v in self.running_layers.read_order()]}
        if op == "shutdown":
            return {"ok": True}
        raise LazyociError(f"unknown request {op!r}")

    async def _shutdown(self) -> None:
        """Stop in seconds even while reads wait on a stalled registry: cancelling the registry
        client first makes every fetch in flight fail, so the FUSE requests waiting on them are
        answered with EIO and the FUSE loop, which waits for its requests, can end.

        The loop goes on answering until no fetch is under way and none has been turned away
        for a moment: a reader whose read failed asks the kernel again, and that request too
        gets EIO, not ENOTCONN from a session that is gone."""
        log.info("shutdown requested")
        client = self.running_layers.client
        client.cancel()
        give_up = time.monotonic() + _DRAIN_MAX_SECONDS
        while time.monotonic() < give_up and (client.transfers_in_flight or
                                              time.monotonic() - client.last_refusal < _DRAIN_QUIET_SECONDS):
            await trio.sleep(0.05)
        pyfuse3.terminate()
        self._cancel.cancel()


def request_is_shutdown(buf: bytes) -> bool:
    try:
        return json.loads(buf.split(b"\n", 1)[0]).get("op") == "shutdown"
    except (ValueError, AttributeError):
        return False


def _daemonize(log_file: Path) -> None:
    """Double fork: the grandchild runs the service, re-parented to init, in its own session."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)     # the intermediate child exits at once
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    fd = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(fd)
    os.close(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lazyoci-service")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--foreground", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    root = DataRoot(args.root.absolute()).ensure()
    paths = ServicePaths(root)
    paths.ensure()
    config = load_config(args.config) if args.config else Config()
    # One service per data root: the pid file is locked BEFORE detaching (the lock belongs to the
    # open file, which the daemon inherits), so when the launcher returns a daemon holds it; a
    # second launcher (two commands starting the service at once) leaves without touching anything.
    pid_fd = os.open(paths.pid_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(pid_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    if not args.foreground:
        _daemonize(paths.log_file)
    logging.basicConfig(
        filename=None if args.foreground else os.fspath(paths.log_file),
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.debug else logging.WARNING)  # one line per Range request otherwise
    _tune_malloc()
    os.ftruncate(pid_fd, 0)
    os.write(pid_fd, f"{os.getpid()}\n".encode())
    try:
        Service(root, config).run()
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


if __name__ == "__main__":
    main()
