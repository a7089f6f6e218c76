"""containerd's Snapshots gRPC service in the lazyoci service, called as containerd's proxy calls it.

A real lazyoci service (FUSE) on a temporary root, a real registry, and grpc's own client
on the service's snapshotter socket: the codes containerd relies on, label updates and
filters, and remote snapshots (an indexed layer committed lazily and answered with
AlreadyExists; a layer without a zTOC, an image without an index or a registry that is
gone: a normal Prepare that containerd then fills).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import push_soci_index, running_service, write_config
from helpers.registry import free_port
from lazyoci.containerd.api import snapshots_v1_pb2 as pb
from lazyoci.containerd.api import snapshots_v1_pb2_grpc as pb_grpc
from lazyoci.containerd.server import snapshotter_socket
from lazyoci.oci.manifest import chain_ids
from lazyoci.store.layout import DataRoot

pytestmark = pytest.mark.needs_root("FUSE and overlay mounts")

OVERLAY = "lazyoci-overlayfs"
SOCI = "soci"


@contextmanager
def snapshots_client(root: Path) -> Iterator[pb_grpc.SnapshotsStub]:
    """A Snapshots client on the service's socket (through /proc/self/fd when the path is long)."""
    sock = snapshotter_socket(DataRoot(root))
    dfd = os.open(sock.parent, os.O_RDONLY | os.O_DIRECTORY)
    channel = grpc.insecure_channel(f"unix:/proc/self/fd/{dfd}/{sock.name}")
    try:
        yield pb_grpc.SnapshotsStub(channel)
    finally:
        channel.close()
        os.close(dfd)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_snapshot_calls_and_codes(data_root, tmp_path):
    config = write_config(tmp_path / "c.yaml")
    with running_service(data_root, config) as service, snapshots_client(data_root) as s:
        sock = snapshotter_socket(DataRoot(data_root))
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert service.status()["containerd_socket"] == str(sock)
        out = subprocess.run([str(Path(sys.executable).parent / "lazyoci"), "--root", str(data_root),
                              "--config", str(config), "service", "status"], capture_output=True, text=True)
        assert f"containerd snapshotter socket: {sock}" in out.stdout

        mounts = s.Prepare(pb.PrepareSnapshotRequest(snapshotter=OVERLAY, key="ns/1/a", labels={"a": "1"})).mounts
        assert mounts[0].type == "overlay" and any(o.startswith("upperdir=") for o in mounts[0].options)
        upper = Path(next(o for o in mounts[0].options if o.startswith("upperdir="))[len("upperdir="):])
        (upper / "hello").write_text("hi\n")
        s.Commit(pb.CommitSnapshotRequest(snapshotter=OVERLAY, name="ns/2/c", key="ns/1/a", labels={"b": "2"}))
        info = s.Stat(pb.StatSnapshotRequest(snapshotter=OVERLAY, key="ns/2/c")).info
        assert info.kind == pb.COMMITTED and dict(info.labels) == {"a": "1", "b": "2"}
        assert s.Usage(pb.UsageRequest(snapshotter=OVERLAY, key="ns/2/c")).inodes == 2

        view = s.View(pb.ViewSnapshotRequest(snapshotter=OVERLAY, key="ns/3/v", parent="ns/2/c")).mounts
        assert str(upper) in view[0].options[0]
        assert s.Mounts(pb.MountsRequest(snapshotter=OVERLAY, key="ns/3/v")).mounts == view

        # containerd's codes: NotFound, AlreadyExists, FailedPrecondition, InvalidArgument
        nf = grpc.StatusCode.NOT_FOUND
        assert _code(lambda: s.Stat(pb.StatSnapshotRequest(snapshotter=OVERLAY, key="nope"))) == nf
        assert _code(lambda: s.Mounts(pb.MountsRequest(snapshotter=OVERLAY, key="nope"))) == nf
        assert _code(lambda: s.Remove(pb.RemoveSnapshotRequest(snapshotter=OVERLAY, key="nope"))) == nf
        assert _code(lambda: s.Prepare(pb.PrepareSnapshotRequest(snapshotter=OVERLAY, key="k", parent="nope"))) == nf
        assert _code(lambda: s.Prepare(pb.PrepareSnapshotRequest(snapshotter="other", key="k"))) == nf
        ae = grpc.StatusCode.ALREADY_EXISTS
        assert _code(lambda: s.Prepare(pb.PrepareSnapshotRequest(snapshotter=OVERLAY, key="ns/2/c"))) == ae
        s.Prepare(pb.PrepareSnapshotRequest(snapshotter=OVERLAY, key="ns/4/b", parent="ns/2/c"))
        assert _code(lambda: s.Commit(pb.CommitSnapshotRequest(snapshotter=OVERLAY, name="ns/2/c", key="ns/4/b"))) == ae
        fp = grpc.StatusCode.FAILED_PRECONDITION
        assert _code(lambda: s.Remove(pb.RemoveSnapshotRequest(snapshotter=OVERLAY, key="ns/2/c"))) == fp
        assert _code(lambda: s.Prepare(pb.PrepareSnapshotRequest(snapshotter=OVERLAY, key="k", parent="ns/4/b"))) == fp
        assert _code(lambda: s.Commit(pb.CommitSnapshotRequest(snapshotter=OVERLAY, name="x", key="ns/3/v"))) == fp
        assert _code(lambda: list(s.List(pb.ListSnapshotsRequest(snapshotter=OVERLAY, filters=['name=="x']))))\
            == grpc.StatusCode.INVALID_ARGUMENT

        # Update: labels only, all of them or one by one
        upd = pb.UpdateSnapshotRequest(snapshotter=OVERLAY, info=pb.Info(name="ns/2/c", labels={"b": "3", "c": "4"}))
        upd.update_mask.paths.append("labels.b")
        assert dict(s.Update(upd).info.labels) == {"a": "1", "b": "3"}
        upd = pb.UpdateSnapshotRequest(snapshotter=OVERLAY, info=pb.Info(name="ns/2/c", labels={"z": "9"}))
        assert dict(s.Update(upd).info.labels) == {"z": "9"}

        # List with containerd's filters (any of the filters; all selectors of one)
        def names(*filters: str) -> set[str]:
            return {i.name for r in s.List(pb.ListSnapshotsRequest(snapshotter=OVERLAY, filters=list(filters)))
                    for i in r.info}
        assert names() == {"ns/2/c", "ns/3/v", "ns/4/b"}
        assert names("kind==committed") == {"ns/2/c"}
        assert names('parent=="ns/2/c",kind==active', "name==ns/3/v") == {"ns/3/v", "ns/4/b"}
        assert names('labels."z"==9') == {"ns/2/c"}

        for key in ("ns/3/v", "ns/4/b", "ns/2/c"):
            s.Remove(pb.RemoveSnapshotRequest(snapshotter=OVERLAY, key=key))
        assert names() == set()
        assert not upper.exists()
        s.Cleanup(pb.CleanupRequest(snapshotter=OVERLAY))


@pytest.fixture(scope="module")
def indexed(registry, tmp_path_factory):
    """An image of two layers: a small one (no zTOC: below the index's minimum) and an indexed one."""
    work = tmp_path_factory.mktemp("indexed")
    small = make_layer([Entry("etc/", kind="dir"), Entry("etc/base.txt", data=b"base\n")])
    big = make_layer([Entry("data/", kind="dir"), Entry("data/needle.txt", data=b"the needle\n")]
                     + [Entry(f"data/f{i}.bin", data=os.urandom(256 << 10)) for i in range(8)])
    manifest = push_image(registry.host, "ctrd/indexed", [small, big], image_config([small, big]), work)
    push_soci_index(registry.host, "ctrd/indexed", work, span_size=64 << 10, min_layer_size=1 << 20)
    plain = push_image(registry.host, "ctrd/plain", [small, big], image_config([small, big]), work)
    return small, big, manifest, plain


def _labels(ref: str, manifest: str, layer: str, layers: list[str], target: str) -> dict[str, str]:
    return {"containerd.io/snapshot.ref": target,
            "containerd.io/snapshot/cri.image-ref": ref,
            "containerd.io/snapshot/cri.manifest-digest": manifest,
            "containerd.io/snapshot/cri.layer-digest": layer,
            "containerd.io/snapshot/cri.image-layers": ",".join(layers)}


def _target_filter(target: str, parent: str) -> str:
    """The filter containerd's metadata store lists with after AlreadyExists."""
    return f'labels."containerd.io/snapshot.ref"=={target},parent=="{parent}"'


def test_remote_snapshot_commits_indexed_layer_and_leaves_the_rest(registry, indexed, data_root, tmp_path):
    small, big, manifest, plain = indexed
    chains = chain_ids([small.diff_id, big.diff_id])
    layers = [small.digest, big.digest]
    ref = f"{registry.host}/ctrd/indexed:latest"
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as service, snapshots_client(data_root) as s:
        # layer 1 has no zTOC: a normal Prepare, labelled with why
        labels = _labels(ref, manifest, small.digest, layers, chains[0])
        s.Prepare(pb.PrepareSnapshotRequest(snapshotter=SOCI, key="ns/1/extract-1", labels=labels))
        info = s.Stat(pb.StatSnapshotRequest(snapshotter=SOCI, key="ns/1/extract-1")).info
        assert info.labels["lazyoci.remote"].startswith("downloaded: the SOCI index sha256:")
        assert "has no zTOC for layer" in info.labels["lazyoci.remote"]
        s.Commit(pb.CommitSnapshotRequest(snapshotter=SOCI, name="ns/2/" + chains[0], key="ns/1/extract-1"))
        # ... and the unpacker, as containerd's, fills it in (here: one file by hand)
        # layer 2 is indexed: committed lazily, AlreadyExists
        labels = _labels(ref, manifest, big.digest, layers, chains[1])
        assert _code(lambda: s.Prepare(pb.PrepareSnapshotRequest(
            snapshotter=SOCI, key="ns/3/extract-2", parent="ns/2/" + chains[0], labels=labels))) \
            == grpc.StatusCode.ALREADY_EXISTS
        found = [i for r in s.List(pb.ListSnapshotsRequest(
            snapshotter=SOCI, filters=[_target_filter(chains[1], "ns/2/" + chains[0])])) for i in r.info]
        assert len(found) == 1 and found[0].kind == pb.COMMITTED and found[0].labels["lazyoci.remote"] == "lazy"
        assert found[0].labels["com.amazon.soci.ztoc-digest"].startswith("sha256:")
        # a second Prepare of the same target finds it at once
        assert _code(lambda: s.Prepare(pb.PrepareSnapshotRequest(
            snapshotter=SOCI, key="ns/4/extract-2", parent="ns/2/" + chains[0], labels=labels))) \
            == grpc.StatusCode.ALREADY_EXISTS
        # the CLI's release of lazy views (rmi, system prune) leaves those containerd stands on
        ztoc = found[0].labels["com.amazon.soci.ztoc-digest"]
        assert service.unmount_layer(big.digest, ztoc) is False
        assert service.paths.view_dir(big.digest, ztoc).is_dir()
        # a container's snapshot over it: its lower is the lazy layer's view
        mounts = s.Prepare(pb.PrepareSnapshotRequest(snapshotter=SOCI, key="ns/5/ctr", parent=found[0].name)).mounts
        lower = next(o for o in mounts[0].options if o.startswith("lowerdir="))[len("lowerdir="):].split(":")
        assert (Path(lower[0]) / "data/needle.txt").read_bytes() == b"the needle\n"
        assert DataRoot(data_root).service.name in lower[0]

        # an image without an index, and one whose registry is gone: normal Prepares
        labels = _labels(f"{registry.host}/ctrd/plain:latest", plain, big.digest, layers, "sha256:" + "1" * 64)
        s.Prepare(pb.PrepareSnapshotRequest(snapshotter=SOCI, key="ns/6/extract", labels=labels))
        why = s.Stat(pb.StatSnapshotRequest(snapshotter=SOCI, key="ns/6/extract")).info.labels["lazyoci.remote"]
        assert why == f"downloaded: image {registry.host}/ctrd/plain:latest has no SOCI index"
        labels = _labels(f"127.0.0.1:{free_port()}/ctrd/indexed:latest", manifest, big.digest, layers,
                         "sha256:" + "2" * 64)
        s.Prepare(pb.PrepareSnapshotRequest(snapshotter=SOCI, key="ns/7/extract", labels=labels))
        why = s.Stat(pb.StatSnapshotRequest(snapshotter=SOCI, key="ns/7/extract")).info.labels["lazyoci.remote"]
        assert why.startswith("downloaded: RegistryError")
        # labels naming a layer the manifest does not have
        labels = _labels(ref, manifest, "sha256:" + "3" * 64, layers, "sha256:" + "4" * 64)
        s.Prepare(pb.PrepareSnapshotRequest(snapshotter=SOCI, key="ns/8/extract", labels=labels))
        why = s.Stat(pb.StatSnapshotRequest(snapshotter=SOCI, key="ns/8/extract")).info.labels["lazyoci.remote"]
        assert why.startswith(f"downloaded: image {ref} ({manifest}) has no layer")

        for key in ("ns/8/extract", "ns/7/extract", "ns/6/extract", "ns/5/ctr", found[0].name, "ns/2/" + chains[0]):
            s.Remove(pb.RemoveSnapshotRequest(snapshotter=SOCI, key=key))
        assert [r for r in s.List(pb.ListSnapshotsRequest(snapshotter=SOCI))] == []


def test_corrupt_ztoc_falls_back_and_a_restart_keeps_the_records(fresh_registry, data_root, tmp_path):
    """A zTOC whose bytes do not match its digest: containerd downloads the layer. Snapshots
    containerd holds survive a service restart, lazy ones served again."""
    work = tmp_path / "work"
    layer = make_layer([Entry("data/", kind="dir"), Entry("data/needle.txt", data=b"the needle\n")]
                       + [Entry(f"data/f{i}.bin", data=os.urandom(128 << 10)) for i in range(4)])
    good = push_image(fresh_registry.host, "ctrd/good", [layer], image_config([layer]), work)
    push_soci_index(fresh_registry.host, "ctrd/good", work, span_size=64 << 10)
    bad_config = image_config([layer], env=["PATH=/bin", "BAD=1"])
    bad = push_image(fresh_registry.host, "ctrd/bad", [layer], bad_config, work)
    index = push_soci_index(fresh_registry.host, "ctrd/bad", work, span_size=64 << 10)
    chain = chain_ids([layer.diff_id])[0]
    from lazyoci.soci.index import SociIndex
    ztoc = SociIndex.parse(fresh_registry.blob_path(index).read_bytes()).layer_map()[layer.digest].digest
    # the two images share the layer; their indexes are the same bytes, so corrupt after using "good"
    config = write_config(tmp_path / "c.yaml")
    with running_service(data_root, config), snapshots_client(data_root) as s:
        labels = _labels(f"{fresh_registry.host}/ctrd/good:latest", good, layer.digest, [layer.digest], chain)
        assert _code(lambda: s.Prepare(pb.PrepareSnapshotRequest(snapshotter=SOCI, key="ns/1/x", labels=labels))) \
            == grpc.StatusCode.ALREADY_EXISTS
        s.Prepare(pb.PrepareSnapshotRequest(snapshotter=SOCI, key="ns/2/ctr", parent="ns/1/x"))
    with running_service(data_root, config), snapshots_client(data_root) as s:
        names = {i.name: i for r in s.List(pb.ListSnapshotsRequest(snapshotter=SOCI)) for i in r.info}
        assert set(names) == {"ns/1/x", "ns/2/ctr"} and names["ns/1/x"].labels["lazyoci.remote"] == "lazy"
        mounts = s.Mounts(pb.MountsRequest(snapshotter=SOCI, key="ns/2/ctr")).mounts
        lower = next(o for o in mounts[0].options if o.startswith("lowerdir="))[len("lowerdir="):].split(":")
        assert (Path(lower[0]) / "data/needle.txt").read_bytes() == b"the needle\n"
        s.Remove(pb.RemoveSnapshotRequest(snapshotter=SOCI, key="ns/2/ctr"))
        s.Remove(pb.RemoveSnapshotRequest(snapshotter=SOCI, key="ns/1/x"))
        # now the registry's zTOC is corrupt and the local copy gone: a normal Prepare
        from lazyoci.store.blobs import BlobStore
        BlobStore(DataRoot(data_root)).delete(ztoc)
        blob = fresh_registry.blob_path(ztoc)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        labels = _labels(f"{fresh_registry.host}/ctrd/bad:latest", bad, layer.digest, [layer.digest], chain)
        s.Prepare(pb.PrepareSnapshotRequest(snapshotter=SOCI, key="ns/3/y", labels=labels))
        why = s.Stat(pb.StatSnapshotRequest(snapshotter=SOCI, key="ns/3/y")).info.labels["lazyoci.remote"]
        assert why.startswith("downloaded: IntegrityError"), why
        s.Remove(pb.RemoveSnapshotRequest(snapshotter=SOCI, key="ns/3/y"))
