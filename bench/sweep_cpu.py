"""CPU of a directory sweep: the header checks and entries written when a name is first looked up.

Usage: .venv/bin/python bench/sweep_cpu.py [--repeat N] [--src DIR]

When the first name is looked up in a directory of a lazy layer, the service checks every child
whose tar header is cached and writes its entry for the session holder (`LayerFS._sweep`), and
the workload waits for that LOOKUP. This sweeps every directory of the python-ml bench image's
largest layer (bench/images/build.py python-ml first) once, as a start does, in one process, with
the layer's tar in memory standing in for the span cache: the CPU is the checks' and the
entries', not the disk's. Its zTOC is built once and cached under bench/cache/. `--src DIR` imports
lazyoci from another tree's src/ (e.g. `git archive main src`): run two trees alternately and
compare the best of each. Least CPU time (of the thread) of --repeat runs, per child swept, and
of it the checks' (`_check_children_cached`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE = HERE / "cache" / "python-ml"


def largest_layer() -> Path:
    """The blob of the image's largest layer."""
    index = json.loads((IMAGE / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((IMAGE / "blobs" / "sha256" / digest).read_bytes())
    layer = max(manifest["layers"], key=lambda d: d["size"])
    return IMAGE / "blobs" / "sha256" / layer["digest"].split(":")[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--src", type=Path, default=HERE.parent / "src", help="import lazyoci from this src/")
    args = ap.parse_args()
    sys.path.insert(0, str(args.src.resolve()))
    from lazyoci.fs import layer_fs
    from lazyoci.fs.header_check import LayerVerifier
    from lazyoci.fs.tree import DIR, LayerTree
    from lazyoci.service.holder_reads import ReadMap
    from lazyoci.ztoc import Ztoc, build_ztoc

    if not IMAGE.exists():
        sys.exit("no python-ml image: run .venv/bin/python bench/images/build.py python-ml first")
    blob = largest_layer()
    cached = HERE / "cache" / f"python-ml-{blob.name[:12]}.ztoc"
    if not cached.exists():
        print(f"generating {cached} ...", file=sys.stderr)
        with blob.open("rb") as f:
            cached.write_bytes(build_ztoc(f, "gzip"))
    with gzip.open(blob) as f:
        tar = f.read()
    ztoc = Ztoc.parse(cached.read_bytes())

    checks = 0.0
    check_children = layer_fs.LayerFS._check_children_cached

    def timed_check(self, *a):     # the checks' share of a sweep
        nonlocal checks
        c0 = time.thread_time()
        try:
            return check_children(self, *a)
        finally:
            checks += time.thread_time() - c0

    layer_fs.LayerFS._check_children_cached = timed_check

    def sweep_all() -> tuple[int, int, float, float]:
        nonlocal checks
        tree = LayerTree(ztoc)
        verifier = LayerVerifier(ztoc, lambda s, e: tar[s:e], lambda s, e: tar[s:e], blob.name)
        fetcher = types.SimpleNamespace(cache=types.SimpleNamespace(cached_bytes=1, has=lambda span: True))   # what _sweep asks
        layer = layer_fs.LazyLayer("sha256:" + blob.name, tree, fetcher, 0.0, verifier)
        bounds = [ztoc.span_uncompressed_range(i)[0] for i in range(ztoc.num_spans)] + [ztoc.uncompressed_size]
        layer.read_map = ReadMap.create(len(tree), bounds, 3600)
        fs = layer_fs.LayerFS()
        fs.add_layer(layer)
        dirs = [n for n in range(len(tree)) if tree.kind[n] == DIR and
                0 < tree.child_count[n] <= layer_fs.SWEEP_CHILDREN]
        checks = 0.0
        c0 = time.thread_time()
        for d in dirs:
            fs._sweep(layer, d)
        return len(dirs), sum(tree.child_count[d] for d in dirs), time.thread_time() - c0, checks

    runs = [sweep_all() for _ in range(args.repeat)]
    dirs, children, cpu, check = min(runs, key=lambda r: r[2])
    print(f"command: .venv/bin/python bench/sweep_cpu.py {' '.join(sys.argv[1:])}   (src {args.src}; "
          f"best of {args.repeat}; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs)")
    print(f"layer {blob.name[:12]}: {len(ztoc)} entries; {dirs} directories swept, {children} children")
    print(f"  sweep cpu {cpu:.3f} s: {cpu / children * 1e6:.1f} us a child, of which checks "
          f"{check / children * 1e6:.1f} us, entries {(cpu - check) / children * 1e6:.1f} us")


if __name__ == "__main__":
    main()
