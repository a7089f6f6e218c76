#!/usr/bin/env python3
"""What a lazy layer costs the service's Python before and while it serves: zTOC parse, tree
build and the per-entry tar header checks, on the layers of a bench image, in-process.

    .venv/bin/python bench/header_checks.py [--image python-ml] [--repeat 3] [--src DIR/src] [--cpu]

Reads the image's gzip layers from bench/cache/IMAGE (built by `run_bench.py`), builds each
layer's zTOC once (kept under bench/work/header-checks/), then times, best of --repeat: parsing
the zTOC (`Ztoc.parse`, every entry validated), building the lazy tree (`LayerTree`), and
checking every entry against its tar header (`LayerVerifier.check_cached`, one entry a call, the
uncompressed tar in memory), in zTOC order and in a shuffled order (lookups in no order: each
check reads its predecessor's header too), and checking every node of the tree as a LOOKUP
that reaches the service does (the entries behind the node, `LayerTree.entries_behind`, in the
tree's order). `--src` times another tree's `src/` (e.g.
`git archive COMMIT src`), for a before/after on the same machine: run both, alternating.
`--cpu` times the thread's CPU instead of the wall clock: steadier on a shared machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "header-checks"


def gzip_layers(image: str) -> list[Path]:
    """The image's gzip layer blobs, from its OCI layout's manifest."""
    layout = HERE / "cache" / image
    if not layout.is_dir():
        raise SystemExit(f"no {layout}: run bench/run_bench.py --images {image} first")
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    return [blobs / d["digest"].split(":")[1] for d in manifest["layers"] if d["mediaType"].endswith("gzip")]


CLOCK = time.perf_counter     # time.thread_time with --cpu


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default="python-ml")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--src", type=Path, default=HERE.parent / "src")
    ap.add_argument("--cpu", action="store_true", help="time the thread's CPU, not the wall clock")
    args = ap.parse_args()
    global CLOCK
    if args.cpu:
        CLOCK = time.thread_time
    sys.path.insert(0, str(args.src.resolve()))
    from lazyoci.fs.header_check import LayerVerifier
    from lazyoci.fs.tree import LayerTree
    from lazyoci.ztoc import Ztoc, build_ztoc

    print(f"    command: python bench/header_checks.py --image {args.image} --repeat {args.repeat}"
          f"{' --src ' + str(args.src) if '--src' in sys.argv else ''}{' --cpu' if args.cpu else ''}   (load average "
          f"{os.getloadavg()[0]:.1f})\n")
    print("| layer | entries | zTOC parse s | tree build s | checks in order µs/entry | checks shuffled µs/entry "
          "| nodes | lookups' checks µs/node |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    WORK.mkdir(parents=True, exist_ok=True)
    for blob in gzip_layers(args.image):
        ztoc_file = WORK / blob.name
        if not ztoc_file.exists():
            with open(blob, "rb") as f:
                ztoc_file.write_bytes(build_ztoc(f, "gzip"))
        data = ztoc_file.read_bytes()
        ztoc = Ztoc.parse(data)
        n = len(ztoc)
        tar = gzip.decompress(blob.read_bytes())
        read = lambda start, end: tar[start:end]   # noqa: E731
        parse = best(lambda: Ztoc.parse(data), args.repeat)
        tree = best(lambda: LayerTree(ztoc), args.repeat)
        in_order = list(range(n))
        shuffled = in_order[:]
        random.Random(1).shuffle(shuffled)

        def checks(order: list[int]) -> None:
            v = LayerVerifier(ztoc, read, read, blob.name)
            for i in order:
                v.check_cached([i])

        built = LayerTree(ztoc)
        nodes = [node for _, node in built.walk()]

        def lookups() -> None:
            v = LayerVerifier(ztoc, read, read, blob.name)
            for node in nodes:
                todo = v.unchecked(built.entries_behind(node))
                if todo:
                    v.check_cached(todo)

        ordered = best(lambda: checks(in_order), args.repeat) / n * 1e6
        mixed = best(lambda: checks(shuffled), args.repeat) / n * 1e6
        looked = best(lookups, args.repeat) / len(nodes) * 1e6
        print(f"| {blob.name[:12]} | {n} | {parse:.3f} | {tree:.3f} | {ordered:.1f} | {mixed:.1f} "
              f"| {len(nodes)} | {looked:.1f} |")


if __name__ == "__main__":
    main()
