#!/usr/bin/env python3
"""Pull time of an image with a big gzip layer: this tree against another tree's src/ (a baseline).

    .venv/bin/python bench/pull_inflate.py --baseline-src /tmp/old/src [--image big-file] [--runs 3]

Each run is `lazyoci pull` (overlayfs: every layer unpacked while it downloads) from
Debian's docker-registry on loopback, with no bandwidth limit so that the CPU work of
the pull (inflate, hash, unpack) decides its time, into an empty data root. The two
trees alternate run by run on the same machine. Wall time and CPU seconds (user+sys of
the lazyoci process, all its threads) are printed per run, then the medians.
Root is needed (the unpack sets owners); the image is built once by bench/images/build.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "images"))

import localreg  # noqa: E402
from build import ensure, image_dir  # noqa: E402
from precompile import compile_lazyoci  # noqa: E402

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def timed_pull(src: Path, ref: str, root: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `lazyoci pull` run with `src` as its lazyoci."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.monotonic()
    proc = subprocess.Popen([LAZYOCI, "--root", str(root), "pull", "-q", ref], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"pull with {src} failed: {proc.stderr.read().decode()}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-src", type=Path, required=True, help="the src/ directory to compare with")
    ap.add_argument("--image", default="big-file")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    trees = {"baseline": args.baseline_src.resolve(), "this tree": (HERE.parent / "src").resolve()}
    compile_lazyoci(*trees.values())
    ensure(args.image)
    work = Path(tempfile.mkdtemp(prefix="pull-inflate-"))
    reg = localreg.start_registry(work / "registry")
    try:
        ref = f"{reg.host}/bench/{args.image}:latest"
        localreg.skopeo_push_layout(image_dir(args.image), ref)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
        for i in range(args.runs):
            for name, src in (trees.items() if i % 2 == 0 else reversed(trees.items())):
                root = work / "root"
                wall, cpu = timed_pull(src, ref, root)
                shutil.rmtree(root)
                results[name].append((wall, cpu))
                print(f"run {i + 1} {name:9}: {wall:6.1f} s wall, {cpu:6.1f} s CPU", flush=True)
        print(f"command: {' '.join(sys.argv)}   machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        for name, runs in results.items():
            print(f"median {name:9}: {statistics.median(w for w, _ in runs):6.1f} s wall, "
                  f"{statistics.median(c for _, c in runs):6.1f} s CPU  ({len(runs)} runs)")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
