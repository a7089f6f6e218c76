"""lazyoci as containerd's remote snapshotter, end to end: a real containerd 1.6 (its own
config, root, state and socket), the lazyoci service as its `soci` proxy snapshotter, the
real registry behind a counting proxy, `lazyoci containerd pull` and `ctr run`.

An indexed image starts while the registry has served under 10% of it; an image without
an index goes through the same path with every layer downloaded. Every containerd, shim
and mount is gone afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.containerd_daemon import ContainerdDaemon, start_containerd
from helpers.fault_proxy import FaultProxy
from helpers.images import LAYER_GZIP, Entry, Layer, image_config, make_layer, push_image, sha, tar_bytes
from helpers.lazy import push_soci_index, running_service, write_config
from lazyoci.containerd.server import snapshotter_socket
from lazyoci.service.client import ServiceClient
from lazyoci.store.layout import DataRoot

pytestmark = [pytest.mark.needs_root("containerd, FUSE and overlay mounts"), pytest.mark.slow]

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
BIG_FILE = 190 << 20


def _busybox_layer() -> Layer:
    """A small base layer: static busybox and the applets the tests run (no zTOC: below the minimum)."""
    entries = [Entry("bin/", kind="dir"), Entry("bin/busybox", data=Path("/bin/busybox").read_bytes(), mode=0o755)]
    entries += [Entry(f"bin/{a}", kind="symlink", linkname="busybox") for a in ("sh", "cat", "ls", "wc")]
    entries += [Entry("etc/", kind="dir"), Entry("proc/", kind="dir"), Entry("dev/", kind="dir"),
                Entry("sys/", kind="dir"), Entry("tmp/", kind="dir", mode=0o1777)]
    return make_layer(entries, "gzip")


def _big_layer() -> Layer:
    """200 MiB: small files, a 190 MiB random file and a needle; gzip by pigz (fast on random data)."""
    entries = [Entry("data/", kind="dir")]
    entries += [Entry(f"data/small{i}.conf", data=f"small file {i}\n".encode() * 20) for i in range(50)]
    entries.append(Entry("data/big.bin", data=os.urandom(BIG_FILE)))
    entries.append(Entry("data/needle.txt", data=b"the needle\n"))
    raw = tar_bytes(entries)
    blob = subprocess.run(["pigz", "-1", "-n", "-c"], input=raw, capture_output=True, check=True).stdout
    return Layer(blob, sha(raw), LAYER_GZIP)


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory):
    """`ctrd/big` with a SOCI index (the big layer has a zTOC, the base none) and `ctrd/big-plain`
    without one (the same layers under another config)."""
    work = tmp_path_factory.mktemp("ctrd-images")
    base, big = _busybox_layer(), _big_layer()
    push_image(registry.host, "ctrd/big", [base, big], image_config([base, big]), work)
    push_soci_index(registry.host, "ctrd/big", work, span_size=1 << 22, min_layer_size=10 << 20)
    push_image(registry.host, "ctrd/big-plain", [base, big], image_config([base, big], env=["PATH=/bin", "PLAIN=1"]), work)
    return base, big


@pytest.fixture
def stack() -> Iterator[tuple[Path, ContainerdDaemon, Path]]:
    """The lazyoci service on a short data root (containerd dials its socket by path) and a containerd
    whose `soci` proxy plugin is that socket."""
    root = Path(tempfile.mkdtemp(prefix="lzroot.", dir="/tmp"))
    config = write_config(Path(tempfile.mkdtemp(prefix="lzconf.", dir="/tmp")) / "config.yaml")
    try:
        with running_service(root, config):
            sock = snapshotter_socket(DataRoot(root))
            daemon = start_containerd(f'[proxy_plugins.soci]\n  type = "snapshot"\n  address = "{sock}"\n')
            try:
                yield root, daemon, config
            finally:
                daemon.stop()
                assert daemon.shim_pids() == [] and daemon.mounts_below() == []
        mounts = Path("/proc/self/mountinfo").read_text()
        assert f" {root}/" not in mounts, "a mount under the data root was left behind"
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(config.parent, ignore_errors=True)


def _pull(root: Path, daemon: ContainerdDaemon, ref: str) -> str:
    r = subprocess.run([LAZYOCI, "--root", str(root), "containerd", "pull", "--address", daemon.address,
                        "--namespace", daemon.namespace, ref], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stderr}\ncontainerd log:\n{daemon.log_tail()}"
    return r.stdout.strip().splitlines()[-1]


def _wait_until_containerd_reconnects(daemon: ContainerdDaemon) -> None:
    """containerd redials a proxy plugin with backoff (at most 3 s in 1.6); calls in between fail
    with Unavailable. Wait (30 s at most) until a List goes through."""
    deadline = time.monotonic() + 30
    while daemon.ctr("snapshots", "--snapshotter", "soci", "ls", check=False).returncode != 0:
        assert time.monotonic() < deadline, "containerd did not reconnect to the restarted service"
        time.sleep(0.2)


def test_ctr_run_reads_a_small_file_of_an_indexed_image_lazily(registry, images, stack):
    base, big = images
    root, daemon, config = stack
    with FaultProxy(registry.host) as proxy:
        ref = f"{proxy.host}/ctrd/big:latest"
        summary = _pull(root, daemon, ref)
        assert summary == f"{ref}: 1 layer(s) lazy, 1 downloaded, 0 already present (soci snapshotter)"
        r = daemon.ctr("run", "--rm", "--snapshotter", "soci", ref, "lazy-1", "cat", "/data/needle.txt")
        assert r.stdout == "the needle\n"
        total = len(base.blob) + len(big.blob)
        assert proxy.bytes_served < total * 0.10, f"the registry served {proxy.bytes_served} of {total} bytes"
        # the snapshot containerd holds for the big layer is lazyoci's lazy one
        info = daemon.ctr("snapshots", "--snapshotter", "soci", "ls").stdout
        assert len(info.strip().splitlines()) == 3      # header, base, big layer
        log = (DataRoot(root).service / "lazyoci.log").read_text()
        assert f"layer {big.digest} of {ref}: lazy through zTOC" in log
        assert f"layer {base.digest} of {ref}: left to containerd to download" in log
        # a restart of the service keeps containerd's snapshots: the image runs again, still lazy
        service = ServiceClient(DataRoot(root), config)
        service.stop()
        service.start()
        _wait_until_containerd_reconnects(daemon)
        r = daemon.ctr("run", "--rm", "--snapshotter", "soci", ref, "lazy-2", "sh", "-c",
                       "cat /data/needle.txt; wc -c < /data/small7.conf")
        assert r.stdout == "the needle\n260\n"
        assert proxy.bytes_served < total * 0.10
    daemon.ctr("images", "rm", "--sync", ref)


def test_ctr_run_of_an_image_without_index_downloads_every_layer(registry, images, stack):
    base, big = images
    root, daemon, _config = stack
    with FaultProxy(registry.host) as proxy:
        ref = f"{proxy.host}/ctrd/big-plain:latest"
        summary = _pull(root, daemon, ref)
        assert summary == f"{ref}: 0 layer(s) lazy, 2 downloaded, 0 already present (soci snapshotter)"
        r = daemon.ctr("run", "--rm", "--snapshotter", "soci", ref, "plain-1", "sh", "-c",
                       "cat /data/needle.txt; echo $PLAIN")
        assert r.stdout == "the needle\n1\n"
        assert proxy.bytes_served >= len(base.blob) + len(big.blob)
        log = (DataRoot(root).service / "lazyoci.log").read_text()
        assert f"layer {big.digest} of {ref}: left to containerd to download (image {ref} has no SOCI index)" in log
    daemon.ctr("images", "rm", "--sync", ref)
