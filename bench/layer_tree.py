"""Lazy layer tree cost: parse a zTOC, build the tree, look up every path, read every name.

Usage: .venv/bin/python bench/layer_tree.py [--files N] [--repeat N] [--src DIR]

The service builds a tree (fs/tree.py) from the zTOC of every layer it mounts,
and every FUSE LOOKUP is a binary search that reads names from the zTOC; this
measures both on a node_modules-like layer (N files in packages of nested
directories, hardlinks, a whiteout per package), whose zTOC is built once and
cached under bench/cache/. `--src DIR` imports lazyoci from another tree's src/
(e.g. `git archive main src`), to compare two versions: run them alternately
and compare the best of each. Least CPU time (user+sys of the process) of
--repeat runs, the steady figure on a shared machine, with that run's wall time.
"""

from __future__ import annotations

import argparse
import inspect
import io
import os
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"


def make_layer(files: int) -> bytes:
    """An uncompressed tar of `files` small files laid out like node_modules."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        per_package = 50
        for p in range(files // per_package):
            pkg = f"app/node_modules/pkg-{p:05d}"
            for d in (pkg, f"{pkg}/lib", f"{pkg}/lib/util"):
                ti = tarfile.TarInfo(d)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tf.addfile(ti)
            for f in range(per_package - 2):
                ti = tarfile.TarInfo(f"{pkg}/lib/{'util/' if f % 3 else ''}file-{f:03d}.js")
                data = f"module.exports = {p * per_package + f};\n".encode()
                ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
                tf.addfile(ti, io.BytesIO(data))
            link = tarfile.TarInfo(f"{pkg}/index.js")
            link.type, link.linkname = tarfile.LNKTYPE, f"{pkg}/lib/file-000.js"
            tf.addfile(link)
            wh = tarfile.TarInfo(f"{pkg}/.wh.README.md")
            tf.addfile(wh, io.BytesIO(b""))
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--src", type=Path, default=HERE.parent / "src", help="import lazyoci from this src/")
    args = ap.parse_args()
    sys.path.insert(0, str(args.src.resolve()))
    from lazyoci.fs.tree import LayerTree
    from lazyoci.ztoc import Ztoc, build_ztoc

    CACHE.mkdir(exist_ok=True)
    cached = CACHE / f"tree-{args.files}.ztoc"
    if not cached.exists():
        print(f"generating {cached} ...", file=sys.stderr)
        cached.write_bytes(build_ztoc(io.BytesIO(make_layer(args.files)), "none"))
    data = cached.read_bytes()
    two_args = len(inspect.signature(LayerTree).parameters) == 2    # before the layer-index seam

    index = Ztoc.parse(data)

    def build() -> LayerTree:
        return LayerTree(index, data) if two_args else LayerTree(index)

    tree = build()
    paths = [p for p, _ in tree.walk()]
    split = [p.split(b"/") for p in paths]

    def lookups() -> None:
        for parts in split:
            n = 0
            for name in parts:
                n = tree.lookup(n, name)

    def names() -> None:
        for n in range(1, len(tree)):
            tree.name(n)

    def parse() -> None:
        Ztoc.parse(data)

    results = {}
    for what, fn in (("parse", parse), ("tree build", build), ("lookups", lookups), ("names", names)):
        best = None
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            run = (time.process_time() - c0, time.perf_counter() - t0)
            best = run if best is None or run < best else best
        results[what] = best
    print(f"command: .venv/bin/python bench/layer_tree.py {' '.join(sys.argv[1:])}   (src {args.src}; "
          f"best of {args.repeat}; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs)")
    print(f"zTOC {len(data) >> 10} KiB, {len(tree)} nodes, {len(paths)} paths looked up, "
          f"{sum(map(len, split))} lookups")
    for what, (cpu, wall) in results.items():
        per = f"   {cpu / sum(map(len, split)) * 1e6:.2f} us of CPU a lookup" if what == "lookups" else ""
        print(f"  {what:10s} cpu {cpu:6.3f} s  (wall {wall:.3f} s){per}")


if __name__ == "__main__":
    main()
