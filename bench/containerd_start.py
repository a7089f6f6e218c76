#!/usr/bin/env python3
"""Time to a container's first output through containerd: lazyoci as its `soci` snapshotter
versus a full pull, and versus lazyoci's own CLI, over a throttled registry (by hand, as root).

    .venv/bin/python bench/containerd_start.py [--rate-mbs 100] [--latency-ms 20] [--runs 2]

The image: a busybox layer and a 200 MiB layer (a 190 MiB random file, a small needle),
with a SOCI index (4 MiB spans). Each run starts from nothing (a fresh containerd, a fresh
lazyoci data root) and reads /data/needle.txt:
  containerd-soci:      `lazyoci containerd pull` + `ctr run --snapshotter soci`
  containerd-overlayfs: `ctr image pull` + `ctr run --snapshotter overlayfs`
  lazyoci-cli:          `lazyoci pull --snapshotter soci` + `lazyoci run --snapshotter soci`
and prints seconds from the pull's start to the first output, and registry bytes (the
proxy's count). It builds its image and starts containerd with the tests' helpers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import localreg  # noqa: E402
from precompile import compile_lazyoci  # noqa: E402
from helpers.containerd_daemon import start_containerd  # noqa: E402
from helpers.images import LAYER_GZIP, Entry, Layer, image_config, make_layer, push_image, sha, tar_bytes  # noqa: E402
from helpers.lazy import push_soci_index, running_service, write_config  # noqa: E402

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def _image(host: str, work: Path) -> None:
    base = [Entry("bin/", kind="dir"), Entry("bin/busybox", data=Path("/bin/busybox").read_bytes(), mode=0o755)]
    base += [Entry(f"bin/{a}", kind="symlink", linkname="busybox") for a in ("sh", "cat")]
    base += [Entry(d, kind="dir") for d in ("etc/", "proc/", "dev/", "sys/", "tmp/")]
    entries = [Entry("data/", kind="dir"), Entry("data/big.bin", data=os.urandom(190 << 20)),
               Entry("data/needle.txt", data=b"the needle\n")]
    raw = tar_bytes(entries)
    blob = subprocess.run(["pigz", "-6", "-n", "-c"], input=raw, capture_output=True, check=True).stdout
    layers = [make_layer(base, "gzip"), Layer(blob, sha(raw), LAYER_GZIP)]
    push_image(host, "bench/ctrd", layers, image_config(layers), work)
    push_soci_index(host, "bench/ctrd", work, span_size=4 << 20, min_layer_size=10 << 20)


def _first_output(cmd: list[str]) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.wait(600)
    if line != b"the needle\n":
        raise SystemExit(f"{' '.join(cmd)}: {line!r} {proc.stderr.read().decode() if proc.stderr else ''}")


def run(mode: str, proxy: localreg.Proxy, n: int) -> tuple[float, int]:
    ref = f"{proxy.host}/bench/ctrd:latest"
    root = Path(tempfile.mkdtemp(prefix="lzbench.", dir="/tmp"))
    config = write_config(root.parent / f"{root.name}.yaml")
    try:
        with running_service(root, config):
            sock = root / "service" / "snapshotter.sock"
            daemon = start_containerd(f'[proxy_plugins.soci]\n  type = "snapshot"\n  address = "{sock}"\n')
            try:
                proxy.reset()
                ctr = ["ctr", "--address", daemon.address, "--namespace", daemon.namespace]
                start = time.monotonic()
                if mode == "containerd-soci":
                    subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), "containerd", "pull",
                                    "-q", "--address", daemon.address, "--namespace", daemon.namespace, ref],
                                   check=True, capture_output=True)
                    _first_output(ctr + ["run", "--rm", "--snapshotter", "soci", ref, f"b{n}", "cat",
                                         "/data/needle.txt"])
                elif mode == "containerd-overlayfs":
                    subprocess.run(ctr + ["image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref],
                                   check=True, capture_output=True)
                    _first_output(ctr + ["run", "--rm", "--snapshotter", "overlayfs", ref, f"b{n}", "cat",
                                         "/data/needle.txt"])
                else:
                    lz = [LAZYOCI, "--root", str(root), "--config", str(config)]
                    subprocess.run(lz + ["pull", "-q", "--snapshotter", "soci", ref], check=True, capture_output=True)
                    _first_output(lz + ["run", "--rm", "--snapshotter", "soci", ref, "cat", "/data/needle.txt"])
                seconds = time.monotonic() - start
                return seconds, int(proxy.stats()["bytes"])
            finally:
                daemon.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        config.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate-mbs", type=float, default=100.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    compile_lazyoci()
    work = Path(tempfile.mkdtemp(prefix="lzbench-work.", dir="/tmp"))
    reg = localreg.start_registry(work / "registry")
    proxy = None
    try:
        _image(reg.host, work)
        proxy = localreg.start_proxy(reg.host, args.rate_mbs, args.latency_ms, work)
        print(f"registry behind {args.rate_mbs:g} MB/s, {args.latency_ms:g} ms per request")
        for mode in ("containerd-soci", "lazyoci-cli", "containerd-overlayfs"):
            for n in range(args.runs):
                seconds, sent = run(mode, proxy, n)
                print(f"{mode:<22} run {n + 1}: {seconds:6.2f} s to first output, {sent / 1e6:7.1f} MB from the registry",
                      flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
