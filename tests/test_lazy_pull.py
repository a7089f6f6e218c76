"""The soci snapshotter end to end: lazy pull with an index from the registry, run with runc
through FUSE lowers, `service status`; and the fallback for an image without an index."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import push_soci_index, write_config
from helpers.tricky_image import GROUP, PASSWD, push_tricky_image
from lazyoci.config import load_config
from lazyoci.images.service import ImageService
from lazyoci.service.client import ServiceClient
from lazyoci.snapshot.soci import SociSnapshotter
from lazyoci.store.layout import DataRoot

pytestmark = pytest.mark.needs_root("FUSE, overlay and runc")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def _lz(root: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def soci_config(tmp_path) -> Path:
    return write_config(tmp_path / "config.yaml", extra="snapshotters:\n  - soci\n")


def test_lazy_pull_run_and_status(registry, data_root, tmp_path, soci_config):
    push_tricky_image(registry.host, "lazy/pull", tmp_path)
    index_digest = push_soci_index(registry.host, "lazy/pull", tmp_path)
    ref = f"{registry.host}/lazy/pull:latest"
    root = DataRoot(data_root)
    images = ImageService(root)
    snap = SociSnapshotter(root, load_config(soci_config), client=images.client)
    lines: list[str] = []
    try:
        image = snap.pull(images, ref, log=lines.append)
        assert image.snapshotter == "soci"
        assert not any(l.startswith("INFO") for l in lines), lines
        # indexed layers were NOT downloaded; their zTOCs and the index were
        assert not any(images.blobs.has(l.digest) for l in image.manifest.layers)
        assert images.blobs.has(index_digest)
        assert all(snap.lazy_layer(l.digest) for l in image.manifest.layers)

        # `run` uses the config's first snapshotter (soci) and reads through the FUSE lowers
        r = _lz(data_root, soci_config, "run", "--rm", ref, "cat", "/etc/passwd")
        assert r.returncode == 0, r.stderr
        assert r.stdout.encode() == PASSWD
        # a non-root user reads through the FUSE lowers too (allow_other; overlay uses the mounter's creds)
        r = _lz(data_root, soci_config, "run", "--rm", "-u", "1000:1000", ref, "cat", "/etc/group")
        assert r.returncode == 0 and r.stdout.encode() == GROUP, r.stderr
        st = _lz(data_root, soci_config, "service", "status")
        assert st.returncode == 0 and "lazy/pull" in st.stdout, st.stdout
        assert not any(images.blobs.has(l.digest) for l in image.manifest.layers)

        # the image's snapshots released (as `rmi` does): the service stops serving its layers
        client = ServiceClient(root, soci_config)
        assert len(client.status()["layers"]) == 3
        removed = snap.release_unused(set())
        assert len(removed) == 3 and list(snap.walk()) == []
        assert client.status()["layers"] == []
        assert not any(client.paths.mountpoint.iterdir())   # no view of any layer left
    finally:
        images.close()
        ServiceClient(root, soci_config).stop()


def test_large_ztocs_come_one_at_a_time_the_largest_first(registry, data_root, tmp_path, soci_config,
                                                          monkeypatch):
    """The layer whose zTOC is largest is mounted first (its recorded prefetch starts first), and
    each large zTOC is downloaded alone, so the next one's mount waits for the one before it."""
    import os

    from lazyoci.snapshot import soci_pull

    layers = [make_layer([Entry(f"d{i}.bin", data=os.urandom(n << 10))]) for i, n in enumerate((640, 1920, 1280))]
    push_image(registry.host, "lazy/order", layers, image_config(layers), tmp_path)
    push_soci_index(registry.host, "lazy/order", tmp_path)      # 64 KiB spans: 10, 30 and 20
    monkeypatch.setattr(soci_pull, "ZTOC_ALONE_BYTES", 1)        # every zTOC of this image is "large"
    root = DataRoot(data_root)
    images = ImageService(root)
    snap = SociSnapshotter(root, load_config(soci_config), client=images.client)
    client = ServiceClient(root, soci_config)
    try:
        snap.pull(images, f"{registry.host}/lazy/order:latest")
        sizes = {l.digest: images.blobs.size(snap.lazy_layer(l.digest).ztoc_digest) for l in layers}
        mounted = [s["layer_digest"] for s in sorted(client.status()["layers"], key=lambda s: s["mounted_at"])]
        assert mounted == sorted(sizes, key=lambda d: -sizes[d])
        assert [l.digest for l in layers[1:]] + [layers[0].digest] == mounted
    finally:
        images.close()
        client.stop()


def test_image_without_index_falls_back_with_one_info_line(registry, data_root, tmp_path, soci_config):
    layer = make_layer([Entry("hello.txt", data=b"hello from a full pull\n")])
    push_image(registry.host, "lazy/noindex", [layer], image_config([layer]), tmp_path)
    root = DataRoot(data_root)
    images = ImageService(root)
    snap = SociSnapshotter(root, load_config(soci_config), client=images.client)
    lines: list[str] = []
    try:
        image = snap.pull(images, f"{registry.host}/lazy/noindex:latest", log=lines.append)
        info = [l for l in lines if l.startswith("INFO")]
        assert len(info) == 1 and "no SOCI index" in info[0], lines
        assert image.snapshotter == "overlayfs"          # never reported as lazy
        assert images.blobs.has(layer.digest)
        top = snap.unpack_image(images, image)
        assert not snap.is_lazy(top)
        assert not ServiceClient(root, soci_config).is_running()   # nothing lazy: no service needed
    finally:
        images.close()


def test_failed_lazy_pull_leaves_no_layer_mounted(registry, data_root, tmp_path, soci_config):
    """Lazy layers are mounted while the image downloads; if the download then fails, the pull
    unmounts them again: nothing is left served (or recorded by the service) for an unpulled image."""
    import json
    import urllib.request

    from helpers.fault_proxy import Fault, FaultProxy
    from lazyoci.errors import LazyociError

    push_tricky_image(registry.host, "lazy/fail", tmp_path)
    push_soci_index(registry.host, "lazy/fail", tmp_path)
    req = urllib.request.Request(f"http://{registry.host}/v2/lazy/fail/manifests/latest",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        manifest = json.loads(r.read())
    root = DataRoot(data_root)
    images = ImageService(root)
    snap = SociSnapshotter(root, load_config(soci_config), client=images.client)
    client = ServiceClient(root, soci_config)
    try:
        with FaultProxy(registry.host) as proxy:
            # the image config is fetched after every zTOC was stored (and its layer mount sent)
            proxy.add(Fault("status", status=404, match=f"/blobs/{manifest['config']['digest']}", times=None))
            with pytest.raises(LazyociError):
                snap.pull(images, f"{proxy.host}/lazy/fail:latest")
        assert client.status()["layers"] == []
        assert not any(client.paths.mountpoint.iterdir())   # no view of any layer left
    finally:
        images.close()
        client.stop()
