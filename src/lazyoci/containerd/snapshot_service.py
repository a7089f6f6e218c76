"""containerd's Snapshots gRPC service (containerd.services.snapshots.v1.Snapshots).

Each request names the snapshotter it is for (the name of the proxy plugin in
containerd's config); the configured names map to lazyoci snapshotters
(`containerd.snapshotters` in the config file). lazyoci's errors become the codes
containerd's proxy turns back into its own: NotFound, AlreadyExists,
FailedPrecondition, InvalidArgument; anything else a user can meet is Unavailable
(a registry or the service) or Unknown, with its one-line message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from lazyoci.containerd.api import snapshots_v1_pb2 as pb
from lazyoci.containerd.api import snapshots_v1_pb2_grpc as pb_grpc
from lazyoci.containerd.api import types_mount_pb2
from lazyoci.containerd.snapshot_backend import SnapshotBackend
from lazyoci.errors import (ConfigError, FormatError, LazyociError, RegistryError, ServiceError,
                            SnapshotExistsError, SnapshotNotFoundError, SnapshotStateError)
from lazyoci.snapshot.base import KIND_ACTIVE, KIND_COMMITTED, KIND_VIEW, Mount, SnapshotInfo

__all__ = ["SnapshotsService", "status_code"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_KINDS = {KIND_VIEW: pb.VIEW, KIND_ACTIVE: pb.ACTIVE, KIND_COMMITTED: pb.COMMITTED}
_LIST_BATCH = 100


def status_code(e: LazyociError) -> grpc.StatusCode:
    """The gRPC code containerd expects for a lazyoci error."""
    if isinstance(e, SnapshotNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, SnapshotExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(e, SnapshotStateError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(e, (ConfigError, FormatError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, (RegistryError, ServiceError)):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.UNKNOWN


def _mounts(mounts: list[Mount]) -> list[types_mount_pb2.Mount]:
    return [types_mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _time(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _info(i: SnapshotInfo) -> pb.Info:
    return pb.Info(name=i.key, parent=i.parent or "", kind=_KINDS.get(i.kind, pb.UNKNOWN),
                   created_at=_time(i.created), updated_at=_time(i.created), labels=i.labels)


class SnapshotsService(pb_grpc.SnapshotsServicer):
    """Serves the snapshotters named in `backends` (containerd's name -> backend)."""

    def __init__(self, backends: dict[str, SnapshotBackend]) -> None:
        self.backends = backends

    def _call(self, context: grpc.ServicerContext, name: str, what: str,
              fn: Callable[[SnapshotBackend], T]) -> T:
        backend = self.backends.get(name)
        if backend is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"lazyoci serves no snapshotter {name!r} (it serves: {', '.join(self.backends)})")
            raise AssertionError("unreachable")    # context.abort raises
        try:
            return fn(backend)
        except LazyociError as e:
            code = status_code(e)
            if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE):
                log.warning("%s on %s: %s", what, name, e)
            context.abort(code, str(e))
        except Exception as e:   # a bug: say so in the log, answer Internal
            log.exception("%s on %s failed", what, name)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {e}")
        raise AssertionError("unreachable")    # context.abort raises

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        mounts = self._call(context, request.snapshotter, "Prepare",
                            lambda b: b.prepare(request.key, request.parent, dict(request.labels)))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    def View(self, request: Any, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        mounts = self._call(context, request.snapshotter, "View",
                            lambda b: b.view(request.key, request.parent, dict(request.labels)))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> pb.MountsResponse:
        mounts = self._call(context, request.snapshotter, "Mounts", lambda b: b.mounts(request.key))
        return pb.MountsResponse(mounts=_mounts(mounts))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._call(context, request.snapshotter, "Commit",
                   lambda b: b.commit(request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._call(context, request.snapshotter, "Remove", lambda b: b.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        info = self._call(context, request.snapshotter, "Stat", lambda b: b.stat(request.key))
        return pb.StatSnapshotResponse(info=_info(info))

    def Update(self, request: Any, context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self._call(context, request.snapshotter, "Update",
                          lambda b: b.update(request.info.name, dict(request.info.labels), paths))
        return pb.UpdateSnapshotResponse(info=_info(info))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[pb.ListSnapshotsResponse]:
        infos = self._call(context, request.snapshotter, "List", lambda b: list(b.walk(list(request.filters))))
        for i in range(0, len(infos), _LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[_info(x) for x in infos[i:i + _LIST_BATCH]])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> pb.UsageResponse:
        usage = self._call(context, request.snapshotter, "Usage", lambda b: b.usage(request.key))
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> empty_pb2.Empty:
        """Nothing to do: a removed snapshot's directory goes with it."""
        self._call(context, request.snapshotter, "Cleanup", lambda b: None)
        return empty_pb2.Empty()
