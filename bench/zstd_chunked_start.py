#!/usr/bin/env python3
"""Lazy start of a zstd:chunked image next to SOCI and a full pull, on one 200 MiB image.

    .venv/bin/python bench/zstd_chunked_start.py [--size-mib 200] [--runs 3]     (as root: FUSE, runc)

One image: a busybox layer and a layer holding one file of random bytes. It is pushed
twice to a loopback registry: as zstd:chunked by skopeo (its own TOC per layer), and as
gzip by skopeo with a SOCI index from lazyoci's builder (4 MiB spans, the reference's
default). Each mode starts from an empty data root and runs
`pull` then `run --rm head -c 100 /data/big`; the table gives the median wall time of
that pair and the bytes the registry served (counted by the test suite's proxy). Modes:
  overlayfs      the zstd:chunked image, every layer downloaded and unpacked
  zstd:chunked   the zstd:chunked image through `--snapshotter soci`, no SOCI index
  soci (zTOC)    the gzip image with its SOCI index through `--snapshotter soci`
Loopback, no throttling: times are CPU and disk on this machine, bytes are the point.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from helpers.fault_proxy import FaultProxy                               # noqa: E402
from helpers.images import Entry, image_config, skopeo_push_layout, write_oci_layout  # noqa: E402
from helpers.lazy import push_soci_index, write_config                   # noqa: E402
from helpers.registry import start_registry                              # noqa: E402
from helpers.tricky_image import APPLETS, BUSYBOX                        # noqa: E402
from helpers.zstd_chunked import go_layer, nonce, push_chunked           # noqa: E402

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def _run(root: Path, config: Path, snapshotter: str, ref: str) -> float:
    base = [LAZYOCI, "--root", str(root), "--config", str(config)]
    started = time.monotonic()
    subprocess.run([*base, "pull", "--snapshotter", snapshotter, ref], check=True, capture_output=True)
    out = subprocess.run([*base, "run", "--rm", "--snapshotter", snapshotter, ref, "head", "-c", "100", "/data/big"],
                         check=True, capture_output=True)
    elapsed = time.monotonic() - started
    assert len(out.stdout) == 100
    subprocess.run([*base, "service", "stop"], capture_output=True)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zc-bench-"))
    reg = start_registry(work / "registry")
    try:
        base = go_layer([Entry("bin/", "dir"), Entry("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755),
                         *[Entry(f"bin/{a}", "symlink", linkname="busybox") for a in APPLETS], nonce()])
        data = go_layer([Entry("data/", "dir"), Entry("data/big", data=os.urandom(args.size_mib << 20)), nonce()])
        src = work / "src"
        write_oci_layout(src, [base, data], image_config([base, data], cmd=["/bin/sh"]))
        push_chunked(src, f"{reg.host}/bench/chunked:latest")
        gz = work / "gz"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-compress", "--dest-compress-format", "gzip",
                        f"oci:{src}:latest", f"oci:{gz}:latest"], check=True, capture_output=True)
        skopeo_push_layout(gz, f"{reg.host}/bench/soci:latest")
        push_soci_index(reg.host, "bench/soci", work, span_size=4 << 20)
        config = write_config(work / "config.yaml")
        modes = [("overlayfs", "overlayfs", "bench/chunked"), ("zstd:chunked", "soci", "bench/chunked"),
                 ("soci (zTOC)", "soci", "bench/soci")]
        rows = []
        for name, snapshotter, repo in modes:
            times, served = [], []
            for i in range(args.runs):
                root = work / f"root-{repo.replace('/', '_')}-{snapshotter}-{i}"
                with FaultProxy(reg.host) as proxy:
                    times.append(_run(root, config, snapshotter, f"{proxy.host}/{repo}:latest"))
                    served.append(proxy.bytes_served)
                shutil.rmtree(root, ignore_errors=True)
            rows.append((name, statistics.median(times), statistics.median(served)))
        print(f"command: {' '.join(sys.argv)}")
        print(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}")
        print(f"image: busybox layer + one {args.size_mib} MiB file of random bytes; workload "
              "`head -c 100 /data/big`; medians of", args.runs, "runs\n")
        print("| mode | pull + run (s) | bytes from the registry |")
        print("|---|---|---|")
        for name, t, b in rows:
            print(f"| {name} | {t:.2f} | {b / 1e6:,.1f} MB |")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
