"""A hostile SOCI index of one image never changes what another image with the same layer sees.

Image A and image B are the same image (one layer blob) in two repositories; A's
repository carries an index whose zTOC swaps two files' data offsets (built with
lazyoci's builder, then rewritten with the project's FlatBuffer encoder), B's an honest
one. Whatever order they run in, and after A is removed, B reads the true bytes and A
gets EIO on the tampered files: each pull's lazy snapshots lie on its own view. Those
tests keep layers on their views (`unpack_complete_layers: false`); the last shows what
happens once the service has unpacked the complete layer, checked against its diff ID: every
image with it, A too, reads the layer's true bytes from then on.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.hostile_ztoc import edited_ztoc, swapped_offsets
from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import write_config
from helpers.tricky_image import BUSYBOX

pytestmark = pytest.mark.needs_root("FUSE, overlay and runc")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
SPAN = 64 << 10
F1, F2 = b"A" * 5000, b"B" * 5000
VIEWS_ONLY = "  unpack_complete_layers: false\nsnapshotters:\n  - soci\n"    # no layer leaves its view


def _lz(root: Path, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), *args],
                       capture_output=True, timeout=180)
    if check and r.returncode != 0:
        raise AssertionError(f"lazyoci {' '.join(args)} exited {r.returncode}: {r.stderr.decode()}")
    return r


def _layer():
    return make_layer([
        Entry("bin", "dir"), Entry("data", "dir"),
        Entry("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755),
        Entry("bin/cat", "symlink", linkname="busybox"),
        Entry("bin/sleep", "symlink", linkname="busybox"),
        Entry("data/f1.bin", data=F1),
        Entry("data/f2.bin", data=F2),
    ])


def _ztoc(blob: bytes, hostile: bool) -> bytes:
    """lazyoci's zTOC of a gzip layer; `hostile`: the data offsets of data/f1.bin and data/f2.bin swapped."""
    return edited_ztoc(blob, SPAN, swapped_offsets(b"data/f1.bin", b"data/f2.bin") if hostile else None)


def _push_index(registry_host: str, repo: str, work: Path, ztoc: bytes) -> str:
    """Push a v1 SOCI index holding `ztoc` for the image's one layer; returns the zTOC digest."""
    from lazyoci.images.service import ImageService
    from lazyoci.oci.reference import Reference
    from lazyoci.soci.index import make_index, ztoc_descriptor
    from lazyoci.soci.push import push_index
    from lazyoci.store.layout import DataRoot

    images = ImageService(DataRoot(work / f"indexer-{repo.replace('/', '_')}"))
    try:
        ref = Reference.parse(f"{registry_host}/{repo}:latest")
        image = images.pull(str(ref))
        zdigest = images.blobs.put_bytes(ztoc)
        index = make_index("v1", [ztoc_descriptor(zdigest, len(ztoc), image.manifest.layers[0], SPAN)],
                           image.manifest.descriptor(), "test")
        images.blobs.put_bytes(index.raw)
        images.blobs.put_bytes(b"{}")          # the index's empty config
        push_index(images.client, ref, images.blobs, index)
        return zdigest
    finally:
        images.close()


@pytest.fixture(scope="module")
def images_ab(registry, tmp_path_factory):
    """(A, B, hostile zTOC, honest zTOC): one image in two repositories, A's index hostile."""
    work = tmp_path_factory.mktemp("shared-layer")
    lay = _layer()
    config = image_config([lay], cmd=["/bin/cat", "/data/f1.bin"])
    refs = []
    for repo in ("sharedlayer/hostile", "sharedlayer/honest"):
        push_image(registry.host, repo, [lay], config, work)
        refs.append(f"{registry.host}/{repo}:latest")
    hostile = _push_index(registry.host, "sharedlayer/hostile", work, _ztoc(lay.blob, hostile=True))
    honest = _push_index(registry.host, "sharedlayer/honest", work, _ztoc(lay.blob, hostile=False))
    return refs[0], refs[1], hostile, honest


def _cat(root: Path, config: Path, ref: str, path: str) -> subprocess.CompletedProcess:
    return _lz(root, config, "run", "--rm", ref, "cat", path, check=False)


def _assert_true_bytes(root: Path, config: Path, ref: str) -> None:
    for path, want in (("/data/f1.bin", F1), ("/data/f2.bin", F2)):
        r = _cat(root, config, ref, path)
        assert r.returncode == 0 and r.stdout == want, (ref, path, r.returncode, r.stderr.decode())


def _assert_eio(root: Path, config: Path, ref: str) -> None:
    """The tampered files are EIO in the container (or, once the whole layer is found broken,
    the container cannot start): never served, neither wrong nor borrowed from another view."""
    for path in ("/data/f1.bin", "/data/f2.bin"):
        r = _cat(root, config, ref, path)
        assert r.returncode != 0 and r.stdout == b"", (ref, path, r.returncode, r.stdout[:20])
    assert "does not match its tar header" in (root / "service/lazyoci.log").read_text()


def _served_ztocs(root: Path, config: Path) -> set[str]:
    from lazyoci.service.client import ServiceClient
    from lazyoci.store.layout import DataRoot

    return {l["ztoc_digest"] for l in ServiceClient(DataRoot(root), config).status()["layers"]}


def _cleanup(root: Path, config: Path) -> None:
    for c in _lz(root, config, "ps", "-a", "-q", check=False).stdout.split():
        _lz(root, config, "rm", "-f", c.decode(), check=False)
    _lz(root, config, "service", "stop", check=False)


def test_hostile_index_first_then_honest_image_and_after_removal(images_ab, data_root, tmp_path):
    a, b, hostile, honest = images_ab
    config = write_config(tmp_path / "config.yaml", extra=VIEWS_ONLY)
    try:
        _assert_eio(data_root, config, a)             # A's own index lies: EIO, never B's bytes
        _assert_true_bytes(data_root, config, b)      # B does not inherit A's lazy snapshot
        cid = _lz(data_root, config, "run", "-d", b, "sleep", "120").stdout.decode().strip()
        _assert_eio(data_root, config, a)             # and A does not inherit B's
        assert _served_ztocs(data_root, config) == {hostile, honest}

        _lz(data_root, config, "rmi", a)              # releases A's snapshots and view
        assert _served_ztocs(data_root, config) == {honest}
        rootfs = data_root / "containers" / cid / "rootfs"
        assert (rootfs / "data/f1.bin").read_bytes() == F1     # B's running container
        assert (rootfs / "data/f2.bin").read_bytes() == F2
        _assert_true_bytes(data_root, config, b)
        _lz(data_root, config, "rm", "-f", cid)
    finally:
        _cleanup(data_root, config)


def test_honest_image_first_then_hostile_index(images_ab, data_root, tmp_path):
    a, b, hostile, honest = images_ab
    config = write_config(tmp_path / "config.yaml", extra=VIEWS_ONLY)
    try:
        _assert_true_bytes(data_root, config, b)
        _assert_eio(data_root, config, a)             # A gets its own (hostile) view, not B's
        _assert_true_bytes(data_root, config, b)      # B unaffected
        _lz(data_root, config, "rmi", a)
        _assert_true_bytes(data_root, config, b)
        assert _served_ztocs(data_root, config) == {honest}
    finally:
        _cleanup(data_root, config)


def test_once_the_layer_is_unpacked_every_image_with_it_reads_its_true_bytes(images_ab, data_root, tmp_path):
    """The honest view completes (background fetch) and the service unpacks the layer, its tar
    checked against the diff ID: the hostile image, pulled afterwards, stacks that directory and
    reads the true bytes, never the swapped ones its zTOC describes."""
    from lazyoci.service.client import ServiceClient
    from lazyoci.store.layout import DataRoot

    a, b, _hostile, honest = images_ab
    config = write_config(tmp_path / "config.yaml", background=True, quiet=0.2, interval_ms=5,
                          extra="snapshotters:\n  - soci\n")
    try:
        _assert_true_bytes(data_root, config, b)
        client = ServiceClient(DataRoot(data_root), config)
        deadline = time.monotonic() + 60
        while [l["unpack"] for l in client.status()["layers"] if l["ztoc_digest"] == honest] != ["unpacked"]:
            assert time.monotonic() < deadline, client.status()["layers"]
            time.sleep(0.1)
        _assert_true_bytes(data_root, config, a)
        _assert_true_bytes(data_root, config, b)
    finally:
        _cleanup(data_root, config)


def test_an_older_data_roots_lazy_layer_records_are_rekeyed(data_root, tmp_path):
    """An older lazyoci kept one `lazy_layers` row per layer: it is rekeyed by (layer, zTOC), so
    a second index's zTOC of the layer is recorded next to it, and its image keeps its zTOC."""
    from lazyoci.config import load_config
    from lazyoci.store.lazy_layer_records import image_ztocs
    from lazyoci.snapshot.soci import LazyLayerRecord, SociSnapshotter
    from lazyoci.store.db import Database
    from lazyoci.store.layout import DataRoot

    root = DataRoot(data_root).ensure()
    layer, z1, z2, index, manifest = ("sha256:" + c * 64 for c in "12345")
    with Database(root.db_path).transaction() as c:
        c.execute("CREATE TABLE lazy_layers (layer_digest TEXT PRIMARY KEY, ztoc_digest TEXT NOT NULL, "
                  "ref TEXT NOT NULL, index_digest TEXT NOT NULL, created REAL NOT NULL)")
        c.execute("INSERT INTO lazy_layers VALUES (?, ?, ?, ?, 1.0)", (layer, z1, f"reg/app@{manifest}", index))
    snap = SociSnapshotter(root, load_config(write_config(tmp_path / "c.yaml")))
    snap.record_lazy_layer(LazyLayerRecord(layer, z2, "reg/other@sha256:" + "6" * 64, index))
    assert snap.lazy_layer(layer, z1).ref == f"reg/app@{manifest}"
    assert snap.lazy_layer(layer, z2).ref.startswith("reg/other@")
    assert image_ztocs(snap.db, "reg/app:latest", manifest) == ({layer: z1}, False)
    SociSnapshotter(root, load_config(tmp_path / "c.yaml"))      # a second time: nothing to do
    assert snap.lazy_layer(layer, z1) is not None and snap.lazy_layer(layer, z2) is not None


def test_snapshot_keys_name_the_ztocs_of_lazy_layers_only():
    """Unpacked layers keep their chain IDs (shared by every image); from the first lazy layer up,
    a key also names the zTOCs below, so two indexes of a layer never share a snapshot."""
    from lazyoci.oci.manifest import chain_ids
    from lazyoci.snapshot.soci import snapshot_keys

    diff_ids = ["sha256:" + c * 64 for c in "abc"]
    chains = chain_ids(diff_ids)
    assert snapshot_keys(diff_ids, [None, None, None]) == chains
    one = snapshot_keys(diff_ids, [None, "sha256:" + "1" * 64, None])
    other = snapshot_keys(diff_ids, [None, "sha256:" + "2" * 64, None])
    assert one[0] == other[0] == chains[0]
    assert [k.split("+ztocs:")[0] for k in one] == chains
    assert one[1] != other[1] and one[2] != other[2]
    assert one[2] != snapshot_keys(diff_ids, [None, None, "sha256:" + "1" * 64])[2]   # position counts
