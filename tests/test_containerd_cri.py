"""The Kubernetes path: containerd's CRI plugin with `snapshotter = "soci"` and
`disable_snapshot_annotations = false` pulls through lazyoci's remote snapshots, and the calls
a kubelet makes (PullImage, RunPodSandbox on the host network, CreateContainer,
StartContainer), sent by a small CRI client, start a pod's container lazily.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers.containerd_daemon import start_containerd
from helpers.cri_client import CriClient
from helpers.fault_proxy import FaultProxy
from helpers.images import LAYER_GZIP, Entry, Layer, image_config, make_layer, push_image, sha, tar_bytes
from helpers.lazy import push_soci_index, running_service, write_config
from lazyoci.containerd.server import snapshotter_socket
from lazyoci.store.layout import DataRoot

pytestmark = [pytest.mark.needs_root("containerd, FUSE and overlay mounts"), pytest.mark.slow]


def _base() -> Layer:
    entries = [Entry("bin/", kind="dir"), Entry("bin/busybox", data=Path("/bin/busybox").read_bytes(), mode=0o755)]
    entries += [Entry(f"bin/{a}", kind="symlink", linkname="busybox") for a in ("sh", "cat", "sleep")]
    entries += [Entry(d, kind="dir") for d in ("etc/", "proc/", "dev/", "sys/", "tmp/")]
    return make_layer(entries, "gzip")


def _data() -> Layer:
    entries = [Entry("data/", kind="dir"), Entry("data/big.bin", data=os.urandom(64 << 20)),
               Entry("data/needle.txt", data=b"the needle\n")]
    raw = tar_bytes(entries)
    blob = subprocess.run(["pigz", "-1", "-n", "-c"], input=raw, capture_output=True, check=True).stdout
    return Layer(blob, sha(raw), LAYER_GZIP)


def _wait_for_log(path: Path, text: str, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return path.read_text()
        time.sleep(0.2)
    return path.read_text() if path.exists() else "(no log)"


def test_cri_pull_and_pod_start_lazily(registry, tmp_path):
    base, data = _base(), _data()
    push_image(registry.host, "cri/app", [base, data], image_config([base, data]), tmp_path)
    # every layer indexed: containerd 1.6's unpacker, once it has to download one layer, fetches every
    # layer above it as well (without unpacking them), which would defeat the lazy ones
    push_soci_index(registry.host, "cri/app", tmp_path, span_size=1 << 20, min_layer_size=0)
    push_image(registry.host, "cri/pause", [base], image_config([base], entrypoint=["/bin/sleep", "3600"]), tmp_path)
    root = Path(tempfile.mkdtemp(prefix="lzroot.", dir="/tmp"))
    config = write_config(tmp_path / "c.yaml")
    try:
        with running_service(root, config), FaultProxy(registry.host) as proxy:
            host = proxy.host
            daemon = start_containerd(
                f'[proxy_plugins.soci]\n  type = "snapshot"\n  address = "{snapshotter_socket(DataRoot(root))}"\n'
                '[plugins."io.containerd.grpc.v1.cri"]\n'
                f'  sandbox_image = "{host}/cri/pause:latest"\n'
                '  stream_server_address = "127.0.0.1"\n  stream_server_port = "0"\n'
                '  restrict_oom_score_adj = true\n'     # a sandbox asks for -998, which a confined root may not set
                '  [plugins."io.containerd.grpc.v1.cri".containerd]\n'
                '    snapshotter = "soci"\n    disable_snapshot_annotations = false\n'
                '  [plugins."io.containerd.grpc.v1.cri".cni]\n'
                f'    bin_dir = "{root}/cni-bin"\n    conf_dir = "{root}/cni-conf"\n'
                f'  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]\n'
                f'    endpoint = ["http://{host}"]\n', cri=True)
            cri = CriClient(daemon.address)
            try:
                ref = f"{host}/cri/app:latest"
                assert cri.pull_image(ref).startswith("sha256:")
                logs = daemon.dir / "pod-logs"
                logs.mkdir()
                pod_config = cri.host_network_pod("lazy-pod", str(logs))
                pod = cri.run_pod(pod_config)
                container = cri.create_container(pod, pod_config, "app", ref, ["cat", "/data/needle.txt"], "app.log")
                cri.start_container(container)
                out = _wait_for_log(logs / "app.log", "the needle")
                assert " stdout F the needle" in out, out
                total = len(base.blob) + len(data.blob)
                log = (DataRoot(root).service / "lazyoci.log").read_text()
                assert f"layer {base.digest} of {ref}: lazy through zTOC" in log, log
                assert f"layer {data.digest} of {ref}: lazy through zTOC" in log, log
                big = [(r.method, r.path[-24:], r.range, r.bytes_sent) for r in proxy.log if r.bytes_sent > 1 << 20]
                assert proxy.bytes_served < total * 0.10, f"the registry served {proxy.bytes_served} of {total} bytes: {big}"
                cri.remove_pod(pod)
                cri.remove_image(ref)
            finally:
                cri.close()
                daemon.stop()
            assert daemon.shim_pids() == [] and daemon.mounts_below() == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
