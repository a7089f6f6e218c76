"""eStargz test images made by the real converter: `ctr-remote images convert --estargz`.

The source image is pushed with skopeo, pulled into a containerd of the test's own
(helpers/containerd_daemon.py), converted there and pushed back to the test's registry.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers.containerd_daemon import ContainerdDaemon, start_containerd
from helpers.images import Layer, image_config, push_image


@contextmanager
def converter() -> Iterator[ContainerdDaemon]:
    """A containerd for ctr-remote, stopped (by PID) whatever happens."""
    cd = start_containerd()
    try:
        yield cd
    finally:
        cd.stop()


def ctr_remote(cd: ContainerdDaemon, *args: str, timeout: float = 600) -> str:
    cmd = ["ctr-remote", "--address", cd.address, "--namespace", cd.namespace, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def convert(cd: ContainerdDaemon, registry_host: str, src_repo: str, dst_repo: str, chunk_size: int = 0,
            extra: tuple[str, ...] = ()) -> None:
    """`ctr-remote images convert --estargz --oci` of src_repo:latest into dst_repo:latest."""
    src, dst = f"{registry_host}/{src_repo}:latest", f"{registry_host}/{dst_repo}:latest"
    cd.ctr("images", "pull", "--plain-http", src)
    args = ["images", "convert", "--estargz", "--oci", *extra]
    if chunk_size:
        args += ["--estargz-chunk-size", str(chunk_size)]
    ctr_remote(cd, *args, src, dst)
    cd.ctr("images", "push", "--plain-http", dst)


def push_estargz(cd: ContainerdDaemon, registry_host: str, repo: str, layers: list[Layer], work: Path,
                 chunk_size: int = 0, cmd: list[str] | None = None) -> None:
    """Push an image of `layers` as `repo`-src, and its eStargz conversion as `repo`."""
    push_image(registry_host, f"{repo}-src", layers, image_config(layers, cmd=cmd), work)
    convert(cd, registry_host, f"{repo}-src", repo, chunk_size)


def fetch_manifest(registry_host: str, repo: str) -> dict:
    out = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry_host}/{repo}:latest"], check=True, capture_output=True)
    return json.loads(out.stdout)


def fetch_blob(registry_host: str, repo: str, digest: str) -> bytes:
    import urllib.request
    with urllib.request.urlopen(f"http://{registry_host}/v2/{repo}/blobs/{digest}") as r:
        return r.read()
