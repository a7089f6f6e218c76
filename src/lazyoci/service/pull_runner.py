"""The service's side of `lazyoci pull` run for the CLI (the conversation: service/pull_requests.py).

A `PullSession` runs one pull in a worker thread of the service, with the library code the CLI
would run (`snapshot/snapshotters.py`'s `pull_image`), over a registry client of its own made
from the CLI's registry settings and asking the CLI for credentials. The lazy layers it mounts
go to this service's own layer manager directly (`ServiceLayers`), not back through the control
socket. A cancel from the CLI, the CLI's connection closing, or the service stopping cancels the
pull: its registry client ends the transfers in flight, and its next progress event, INFO line or
credentials question raises PullCancelled, so the pull rolls back as it does when Ctrl-C
interrupts it in the CLI (blobs never published half-written, its lazy mounts undone).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazyoci.errors import LazyociError, PullCancelled, ServiceError
from lazyoci.service.error_wire import error_from_reply, error_reply
from lazyoci.service.pull_requests import PullRequest, registry_environment

if TYPE_CHECKING:
    from lazyoci.config import Config
    from lazyoci.images.progress import ProgressEvent
    from lazyoci.registry.client import RegistryClient
    from lazyoci.registry.credentials import Credentials
    from lazyoci.service.layers import LayerManager
    from lazyoci.service.paths import ServicePaths
    from lazyoci.store.layout import DataRoot

__all__ = ["PullSession", "ServiceLayers"]

log = logging.getLogger("lazyoci.service")
_ANSWER_POLL = 0.2      # how often a credentials question looks whether the pull was cancelled meanwhile


class ServiceLayers:
    """The layer server of a pull the service runs: the service's own layers, called in-process
    (the `LayerServer` protocol of snapshot/layer_server.py). `unmount` is the service's, which
    keeps views containerd's snapshots stand on."""

    def __init__(self, layers: "LayerManager", paths: "ServicePaths",
                 unmount: Callable[[str, str], bool]) -> None:
        self.layers = layers
        self.paths = paths
        self._unmount = unmount

    def spawn(self) -> None:
        """Running already: this is the service."""

    def ensure_running(self) -> object:
        return {"pid": os.getpid()}

    def is_running(self) -> bool:
        return True

    def mount_layer(self, ref: str, layer_digest: str, index_digest: str) -> Path:
        self.layers.mount(ref, layer_digest, index_digest)
        return self.paths.view_dir(layer_digest, index_digest)

    def begin_mount(self, ref: str, layer_digest: str, index_digest: str) -> None:
        """The pull goes on while the view's tree is built and the view attached."""
        self.layers.mount(ref, layer_digest, index_digest, attach_later=True)

    def unmount_layer(self, layer_digest: str, index_digest: str) -> bool:
        return self._unmount(layer_digest, index_digest)

    def view_dir(self, layer_digest: str, index_digest: str) -> Path:
        return self.paths.view_dir(layer_digest, index_digest)

    def lower_dir(self, layer_digest: str, index_digest: str) -> Path:
        return self.paths.lower_dir(layer_digest, index_digest)

    def recorded_views(self) -> list[tuple[str, str]]:
        from lazyoci.service.view_records import recorded_views
        from lazyoci.store.db import Database

        return recorded_views(Database(self.paths.root.db_path))

    def release_views(self, views: list[tuple[str, str]]) -> None:
        for layer_digest, index_digest in views:
            self.unmount_layer(layer_digest, index_digest)


class PullSession:
    """One pull a CLI asked for on `sock` (its request already read; `leftover`: what came after it)."""

    def __init__(self, sock: socket.socket, leftover: bytes, request: dict[str, Any], root: "DataRoot",
                 config: "Config", layers: ServiceLayers) -> None:
        self.sock = sock
        self.request = request
        self.root = root
        self.config = config
        self.layers = layers
        self._leftover = leftover
        self._cancelled = threading.Event()
        self._client: RegistryClient | None = None
        self._lock = threading.Lock()             # the client, once made
        self._send_lock = threading.Lock()
        self._asking = threading.Lock()           # one credentials question at a time
        self._answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="pull-conversation", daemon=True)

    # -- the pull ------------------------------------------------------------------------------

    def run(self) -> None:
        """Run the pull and answer; returns once the pull has ended (or rolled back) and the
        connection is done. Runs in a worker thread."""
        try:
            reply = self._run()
        except LazyociError as e:
            reply = error_reply(e)
        except Exception as e:    # a bug: the CLI says so in one line, the log keeps the traceback
            log.exception("pull for the CLI failed")
            reply = {"ok": False, "error": f"internal error: {e}", "type": "LazyociError"}
        try:
            self._send(reply)
        except (OSError, PullCancelled):
            pass                   # the CLI is gone
        try:
            self.sock.shutdown(socket.SHUT_RDWR)      # wakes the reader
        except OSError:
            pass
        if self._reader.ident is not None:      # started
            self._reader.join()
        self.sock.close()

    def _run(self) -> dict[str, Any]:
        from lazyoci.images.service import ImageService
        from lazyoci.oci.platform import Platform
        from lazyoci.registry.client import RegistryClient
        from lazyoci.registry.options import RegistryOptions
        from lazyoci.snapshot.snapshotters import pull_image

        req = PullRequest.from_json(self.request)
        mine = registry_environment()
        if dict(req.environment) != mine:
            differ = sorted(set(req.environment.items()) ^ set(mine.items()))
            return {"ok": False, "elsewhere": "the service's environment differs in "
                    + ", ".join(sorted({k for k, _ in differ}))}
        self._reader.start()
        log.info("pull of %s (%s) for pid %s", req.ref, req.snapshotter, self._peer_pid())
        options = RegistryOptions(insecure_registries=req.insecure_registries, mirrors=dict(req.mirrors))
        client = RegistryClient(options, self._credentials)
        with self._lock:
            self._client = client
        if self._cancelled.is_set():
            client.cancel()
        images = ImageService(self.root, options, client=client)
        try:
            platform = Platform.parse(req.platform) if req.platform else None
            image = pull_image(images, req.ref, platform, req.snapshotter, self.config,
                               self._progress if req.progress else None, all_platforms=req.all_platforms,
                               index_digest=req.index_digest, log=self._info, server=self.layers)
        except BaseException as e:
            if self._cancelled.is_set():
                log.info("pull of %s cancelled (%s)", req.ref, e)
            raise
        finally:
            client.close()          # (not images.close(): the database's idle connection is the service's)
        log.info("pull of %s done: %s", req.ref, image.digest)
        return {"ok": True, "digest": image.digest}

    def cancel(self) -> None:
        """Stop the pull: transfers in flight end, its next event raises PullCancelled."""
        self._cancelled.set()
        with self._lock:
            client = self._client
        if client is not None:
            client.cancel()

    def _check(self) -> None:
        if self._cancelled.is_set():
            raise PullCancelled("pull cancelled")

    def _peer_pid(self) -> int | str:
        try:
            pid, _, _ = struct.unpack("3i", self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
            return pid
        except OSError:
            return "?"

    # -- what goes to the CLI ---------------------------------------------------------------------

    def _send(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode() + b"\n"
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                self.cancel()          # the CLI is gone: nobody wants this pull any more
                raise PullCancelled("pull cancelled: the CLI went away") from None

    def _progress(self, event: "ProgressEvent") -> None:
        self._check()
        self._send({"progress": [event.key, event.kind, event.status, event.current, event.total]})

    def _info(self, line: str) -> None:
        self._check()
        self._send({"info": line})

    def _credentials(self, registry: str) -> "Credentials | None":
        """The CLI's stored credentials of `registry` (read by the CLI, as its own pull would)."""
        from lazyoci.registry.credentials import Credentials

        with self._asking:
            self._check()
            self._send({"credentials": registry})
            while True:
                try:
                    answer = self._answers.get(timeout=_ANSWER_POLL)
                    break
                except queue.Empty:
                    self._check()
        self._check()
        if "credentials_error" in answer:
            error = answer["credentials_error"]
            raise error_from_reply(error if isinstance(error, dict) else {})
        creds = answer.get("credentials")
        if creds is None:
            return None
        if not (isinstance(creds, dict) and isinstance(creds.get("username"), str)
                and isinstance(creds.get("password"), str)):
            raise ServiceError("the CLI sent malformed credentials")
        return Credentials(creds["username"], creds["password"])

    # -- what comes from the CLI ------------------------------------------------------------------

    def _read(self) -> None:
        """The CLI's answers and cancel; its end of the connection closing cancels the pull."""
        buf = self._leftover
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    msg = None
                if not isinstance(msg, dict):
                    continue
                if msg.get("op") == "cancel":
                    log.info("the CLI cancels its pull")
                    self.cancel()
                elif "credentials" in msg or "credentials_error" in msg:
                    self._answers.put(msg)
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
        self.cancel()               # (a pull that has ended already is not affected)
