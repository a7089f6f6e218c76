"""The service's gRPC server for containerd: Snapshots on <root>/service/snapshotter.sock.

gRPC runs in its own threads (grpcio's server and thread pool), beside the service's
trio loop, which stays with FUSE and the control socket: a snapshot call is SQLite and
file work, plus a layer mount, which LayerManager does from any thread. The socket is
made with umask 0177 and chmod 0600 in the 0700 service directory: root only, as the
control socket.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

from lazyoci.config import Config
from lazyoci.errors import ServiceError
from lazyoci.service.paths import ServicePaths, socket_address
from lazyoci.store.layout import DataRoot

if TYPE_CHECKING:
    import grpc

    from lazyoci.containerd.snapshotters import ContainerdSoci, ViewMounter
    from lazyoci.registry import RegistryClient

__all__ = ["SnapshotterServer", "snapshotter_socket"]

log = logging.getLogger(__name__)
_WORKERS = 8       # containerd prepares the layers of an image in turn, and several images at once


def snapshotter_socket(root: DataRoot) -> Path:
    """Where containerd's proxy plugin connects: next to the service's control socket."""
    return ServicePaths(root).dir / "snapshotter.sock"


class SnapshotterServer:
    """The Snapshots service for containerd, started and stopped with the lazyoci service."""

    def __init__(self, root: DataRoot, config: Config, layers: "ViewMounter", client: "RegistryClient") -> None:
        self.root = root
        self.config = config
        self.layers = layers
        self.client = client
        self.socket = snapshotter_socket(root)
        self._server: "grpc.Server | None" = None
        self._soci: "ContainerdSoci | None" = None

    def start(self) -> None:
        import grpc

        from lazyoci.containerd.api import snapshots_v1_pb2_grpc
        from lazyoci.containerd.remote import RemoteLayers
        from lazyoci.containerd.snapshot_backend import SnapshotBackend
        from lazyoci.containerd.snapshot_service import SnapshotsService
        from lazyoci.containerd.snapshotters import ContainerdOverlay, ContainerdSoci
        from lazyoci.store.blobs import BlobStore
        from lazyoci.store.db import Database

        db = Database(self.root.db_path)
        remote = (RemoteLayers(self.client, BlobStore(self.root), db)
                  if self.config.containerd.remote_snapshots else None)
        backends: dict[str, SnapshotBackend] = {}
        made: dict[str, ContainerdOverlay | ContainerdSoci] = {}
        for name, kind in self.config.containerd.snapshotters.items():
            if kind not in made:
                made[kind] = (ContainerdSoci(self.root, self.config, self.layers, db) if kind == "soci"
                              else ContainerdOverlay(self.root, db, sync_fs=self.config.unpack_sync_fs))
            backends[name] = SnapshotBackend(made[kind], remote)
        soci = made.get("soci")
        self._soci = soci if isinstance(soci, ContainerdSoci) else None
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="containerd"))
        snapshots_v1_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(backends), server)
        self.socket.unlink(missing_ok=True)
        addr, dfd = socket_address(self.socket)
        old = os.umask(0o177)
        try:
            bound = server.add_insecure_port(f"unix:{addr}")
            if not bound:
                raise ServiceError(f"cannot listen on {self.socket}")
            server.start()
        finally:
            os.umask(old)
            if dfd is not None:
                os.close(dfd)
        os.chmod(self.socket, 0o600)
        self._server = server
        log.info("containerd snapshotter socket %s (snapshotters: %s)", self.socket,
                 ", ".join(f"{n}={k}" for n, k in self.config.containerd.snapshotters.items()))

    def uses_view(self, layer_digest: str, ztoc_digest: str) -> bool:
        """True while containerd holds a snapshot on this lazy view: the service keeps it mounted
        (the CLI's `rmi`/`system prune` release only the views of the CLI's own images)."""
        return self._soci is not None and self._soci.uses_view(layer_digest, ztoc_digest)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=2).wait()
            self._server = None
        self.socket.unlink(missing_ok=True)
