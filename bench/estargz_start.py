"""Lazy start of one eStargz image three ways: full pull, through a SOCI index, through its own TOCs.

    sudo .venv/bin/python bench/estargz_start.py [--runs 3] [--rate-mbs 20] [--latency-ms 20]

The image: a busybox layer and a layer of 200 MiB in four random files, built with Python's
tarfile, converted by `ctr-remote images convert --estargz --oci` (in a containerd of this
script's own) and given a SOCI index by `lazyoci push --snapshotter soci` (zTOCs for the
same eStargz blobs: eStargz is gzip). Every run starts on an empty data root, through
bench/throttle_proxy.py, and times `lazyoci pull` + `lazyoci run --rm` until the workload
(`head -c 100000 /data/f2`) prints `ready`. Modes: overlayfs (full pull), soci (zTOCs),
stargz (the layers' own TOCs). Prints a Markdown table with the command and the machine.
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
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import localreg  # noqa: E402
from helpers.estargz import convert, converter, fetch_manifest  # noqa: E402
from helpers.images import Entry, image_config, make_layer, push_image  # noqa: E402

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
MODES = ("overlayfs", "soci", "stargz")
WORKLOAD = ["sh", "-c", "head -c 100000 /data/f2 > /dev/null && echo ready"]


def lz(root: Path, cfg: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    p = subprocess.run([LAZYOCI, "--root", str(root), "--config", str(cfg), *args], capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"lazyoci {' '.join(args)} exited {p.returncode}: {p.stderr[-600:]}")
    return p


def prepare(work: Path, reg: localreg.Registry) -> tuple[str, int]:
    """Push the eStargz image and its SOCI index; returns its repository and its size in bytes."""
    busybox = Path("/bin/busybox").read_bytes()
    base = make_layer([Entry("bin", "dir"), Entry("bin/busybox", data=busybox, mode=0o755)]
                      + [Entry(f"bin/{a}", "symlink", linkname="busybox") for a in ("sh", "head", "echo")])
    big = make_layer([Entry("data", "dir")] + [Entry(f"data/f{i}", data=os.urandom(50 << 20)) for i in range(4)])
    push_image(reg.host, "bench/src", [base, big], image_config([base, big]), work)
    with converter() as cd:
        convert(cd, reg.host, "bench/src", "bench/esgz", extra=("--estargz-compression-level", "6"))
    root, cfg = work / "indexer", work / "indexer.yaml"
    cfg.write_text("snapshotters:\n  - overlayfs\n")
    ref = f"{reg.host}/bench/esgz:latest"
    lz(root, cfg, "pull", "-q", ref)
    lz(root, cfg, "push", "--snapshotter", "soci", ref)
    shutil.rmtree(root, ignore_errors=True)
    manifest = fetch_manifest(reg.host, "bench/esgz")
    return "bench/esgz", manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])


def one_run(ref: str, mode: str, proxy: localreg.Proxy, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    root, cfg = run_dir / "root", run_dir / "config.yaml"
    root.mkdir(parents=True)
    cfg.write_text(f"snapshotters:\n  - {mode}\nsoci:\n  background_fetch: false\n")
    try:
        proxy.reset()
        t0 = time.monotonic()
        out = lz(root, cfg, "run", "--rm", ref, *WORKLOAD).stdout
        total = time.monotonic() - t0
        if out.strip() != "ready":
            raise RuntimeError(f"{mode}: workload printed {out!r}")
        s = proxy.stats()
        return {"total_s": total, "bytes": s["bytes"], "requests": s["requests"]}
    finally:
        subprocess.run([LAZYOCI, "--root", str(root), "--config", str(cfg), "service", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate-mbs", type=float, default=20.0)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lazyoci-estargz-bench-"))
    reg = localreg.start_registry(work / "registry")
    proxy = None
    try:
        repo, size = prepare(work, reg)
        proxy = localreg.start_proxy(reg.host, args.rate_mbs, args.latency_ms, work)
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for i in range(args.runs):
            for mode in MODES:          # interleaved, so drift hits every mode alike
                results[mode].append(one_run(f"{proxy.host}/{repo}:latest", mode, proxy, work / "run"))
        print(f"`{' '.join(sys.argv)}` on {platform.node()} ({os.cpu_count()} CPUs), "
              f"{args.rate_mbs} MB/s + {args.latency_ms} ms per request, the eStargz image "
              f"{size / 2**20:.0f} MiB, medians of {args.runs} runs\n")
        print("| mode | pull + run to ready, s | bytes from the registry | requests |")
        print("|---|---|---|---|")
        for mode in MODES:
            rs = results[mode]
            print(f"| {mode} | {statistics.median(r['total_s'] for r in rs):.2f} | "
                  f"{statistics.median(r['bytes'] for r in rs) / 2**20:.1f} MiB | "
                  f"{statistics.median(r['requests'] for r in rs):.0f} |")
    finally:
        if proxy is not None:
            proxy.stop()
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
