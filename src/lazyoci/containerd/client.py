"""A small client of containerd's gRPC API: content, images, leases, snapshots, diff.

What `lazyoci containerd pull` needs and no more. Every call carries the namespace
(`containerd-namespace` metadata) and, inside `lease()`, the lease
(`containerd-lease`), so that nothing written is collected before the image record
holds it. containerd's errors come back as lazyoci's: NotFound ->
SnapshotNotFoundError, AlreadyExists -> SnapshotExistsError, an unreachable socket ->
ServiceError, anything else -> StoreError with containerd's message.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from lazyoci.containerd.api import (content_v1_pb2, content_v1_pb2_grpc, diff_v1_pb2, diff_v1_pb2_grpc,
                                    images_v1_pb2, images_v1_pb2_grpc, leases_v1_pb2, leases_v1_pb2_grpc,
                                    snapshots_v1_pb2, snapshots_v1_pb2_grpc, types_descriptor_pb2,
                                    types_mount_pb2)
from lazyoci.errors import LazyociError, ServiceError, SnapshotExistsError, SnapshotNotFoundError, StoreError

__all__ = ["ContainerdClient", "DEFAULT_ADDRESS", "DEFAULT_NAMESPACE"]

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
_CHUNK = 1 << 20
_LEASE_SECONDS = 3600


def _error(e: grpc.RpcError, what: str) -> LazyociError:
    code, details = e.code(), e.details()
    if code == grpc.StatusCode.NOT_FOUND:
        return SnapshotNotFoundError(f"{what}: {details}")
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return SnapshotExistsError(f"{what}: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServiceError(f"containerd is not reachable ({what}): {details}")
    return StoreError(f"containerd: {what}: {details}")


class ContainerdClient:
    """containerd at `address`, in namespace `namespace`."""

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE,
                 timeout: float = 600.0) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{address}")
        self._lease: str | None = None
        self.content = content_v1_pb2_grpc.ContentStub(self._channel)
        self.images = images_v1_pb2_grpc.ImagesStub(self._channel)
        self.leases = leases_v1_pb2_grpc.LeasesStub(self._channel)
        self.snapshots = snapshots_v1_pb2_grpc.SnapshotsStub(self._channel)
        self.diff = diff_v1_pb2_grpc.DiffStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _md(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        if self._lease:
            md.append(("containerd-lease", self._lease))
        return md

    def _call(self, method: Any, request: Any, what: str) -> Any:
        try:
            return method(request, metadata=self._md(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise _error(e, what) from None

    # ---- leases ----------------------------------------------------------------
    @contextmanager
    def lease(self) -> Iterator[str]:
        """A lease for the calls inside (it expires by itself if this process dies)."""
        expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + _LEASE_SECONDS))
        lease_id = f"lazyoci-{uuid.uuid4().hex}"
        self._call(self.leases.Create, leases_v1_pb2.CreateRequest(
            id=lease_id, labels={"containerd.io/gc.expire": expire}), "create lease")
        self._lease = lease_id
        try:
            yield lease_id
        finally:
            self._lease = None
            try:
                self._call(self.leases.Delete, leases_v1_pb2.DeleteRequest(id=lease_id), "delete lease")
            except LazyociError:
                pass       # it expires

    # ---- content -----------------------------------------------------------------
    def has_content(self, digest: str) -> bool:
        try:
            self._call(self.content.Info, content_v1_pb2.InfoRequest(digest=digest), f"content {digest}")
        except SnapshotNotFoundError:
            return False
        return True

    def set_content_labels(self, digest: str, labels: dict[str, str]) -> None:
        req = content_v1_pb2.UpdateRequest(info=content_v1_pb2.Info(digest=digest, labels=labels))
        req.update_mask.paths.extend(f"labels.{k}" for k in labels)
        self._call(self.content.Update, req, f"label content {digest}")

    def write_content(self, digest: str, size: int, chunks: Iterable[bytes], labels: dict[str, str]) -> None:
        """Write a blob; containerd checks size and digest at commit (and so do our own readers)."""
        ref = f"lazyoci-{uuid.uuid4().hex}"     # a fresh ref: never resumes a stale partial write

        def requests() -> Iterator[Any]:
            W = content_v1_pb2
            yield W.WriteContentRequest(action=W.STAT, ref=ref, total=size, expected=digest)
            offset = 0
            for chunk in chunks:
                for i in range(0, len(chunk), _CHUNK):
                    part = chunk[i:i + _CHUNK]
                    yield W.WriteContentRequest(action=W.WRITE, ref=ref, offset=offset, data=part)
                    offset += len(part)
            yield W.WriteContentRequest(action=W.COMMIT, ref=ref, offset=offset, total=size, expected=digest,
                                        labels=labels)

        try:
            for _ in self.content.Write(requests(), metadata=self._md(), timeout=self.timeout):
                pass
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                return
            try:
                self.content.Abort(content_v1_pb2.AbortRequest(ref=ref), metadata=self._md(), timeout=30)
            except grpc.RpcError:
                pass
            raise _error(e, f"write content {digest}") from None

    # ---- snapshots -------------------------------------------------------------------
    def stat_snapshot(self, snapshotter: str, key: str) -> bool:
        try:
            self._call(self.snapshots.Stat, snapshots_v1_pb2.StatSnapshotRequest(
                snapshotter=snapshotter, key=key), f"snapshot {key}")
        except SnapshotNotFoundError:
            return False
        return True

    def prepare(self, snapshotter: str, key: str, parent: str, labels: dict[str, str]) -> list[Any]:
        """The mounts of a new active snapshot; SnapshotExistsError when the snapshotter already
        has the target (`containerd.io/snapshot.ref`): a remote snapshot."""
        resp = self._call(self.snapshots.Prepare, snapshots_v1_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=labels), f"prepare {key}")
        return list(resp.mounts)

    def commit(self, snapshotter: str, name: str, key: str, labels: dict[str, str]) -> None:
        self._call(self.snapshots.Commit, snapshots_v1_pb2.CommitSnapshotRequest(
            snapshotter=snapshotter, name=name, key=key, labels=labels), f"commit {name}")

    def remove(self, snapshotter: str, key: str) -> None:
        self._call(self.snapshots.Remove, snapshots_v1_pb2.RemoveSnapshotRequest(
            snapshotter=snapshotter, key=key), f"remove {key}")

    # ---- diff ------------------------------------------------------------------------
    def apply(self, media_type: str, digest: str, size: int, mounts: list[types_mount_pb2.Mount]) -> str:
        """Unpack a layer from the content store onto mounts; returns its diff ID (containerd's digest
        of the uncompressed tar)."""
        resp = self._call(self.diff.Apply, diff_v1_pb2.ApplyRequest(
            diff=types_descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size),
            mounts=mounts), f"apply layer {digest}")
        return str(resp.applied.digest)

    # ---- images ------------------------------------------------------------------------
    def put_image(self, name: str, media_type: str, digest: str, size: int, labels: dict[str, str]) -> None:
        """Create the image record, or point an existing one at this target."""
        image = images_v1_pb2.Image(name=name, labels=labels, target=types_descriptor_pb2.Descriptor(
            media_type=media_type, digest=digest, size=size))
        try:
            self._call(self.images.Create, images_v1_pb2.CreateImageRequest(image=image), f"create image {name}")
        except SnapshotExistsError:
            req = images_v1_pb2.UpdateImageRequest(image=image)
            req.update_mask.paths.append("target")
            self._call(self.images.Update, req, f"update image {name}")
