#!/usr/bin/env python3
"""CPU of inflating every span of a gzip layer through its zTOC, against a whole-stream inflate.

    .venv/bin/python bench/span_inflate.py [--image python-ml] [--rounds 3] [--baseline-src DIR]

A lazy start inflates each span it fetches (`Ztoc.decompress_span`); the service does it
beside the FUSE requests of the workload, on the same cores. This takes the largest layer
of a bench image (built once by bench/images/build.py), builds its zTOC with lazyoci's
default layout, holds every span's compressed bytes in memory and inflates them all, span
by span. The reference in the same run is zlib-ng inflating the whole layer as one stream,
1 MiB of gzip at a time (what a full pull's inflate does for the same bytes). With
`--baseline-src` the spans are inflated by another tree's src/ too (a child process each
round, the trees alternating). Printed per round: CPU seconds and page faults; then medians,
and MB/s of uncompressed output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "images"))

from build import ensure, image_dir, manifest_of  # noqa: E402

# Run in a child with the tree's src/ first on sys.path: inflate every span, print JSON.
_CHILD = r"""
import json, resource, sys, time
from lazyoci.ztoc.reader import Ztoc
ztoc = Ztoc.parse(open(sys.argv[1], "rb").read())
blob = open(sys.argv[2], "rb").read()
pieces = [(i, blob[a:b]) for i, (a, b) in ((i, ztoc.span_compressed_range(i)) for i in range(ztoc.num_spans))]
del blob
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cpu = time.process_time()
out = 0
for i, piece in pieces:
    out += len(ztoc.decompress_span(i, piece))
print(json.dumps({"cpu_s": time.process_time() - cpu, "bytes": out, "spans": len(pieces),
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}))
"""

_WHOLE = r"""
import json, resource, sys, time
from zlib_ng import zlib_ng
blob = open(sys.argv[1], "rb").read()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cpu = time.process_time()
inflater = zlib_ng.decompressobj(47)
out = 0
view = memoryview(blob)
for at in range(0, len(blob), 1 << 20):        # the layer as it streams in: 1 MiB of gzip at a time
    out += len(inflater.decompress(view[at:at + (1 << 20)]))
out += len(inflater.flush())
print(json.dumps({"cpu_s": time.process_time() - cpu, "bytes": out,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}))
"""


def largest_layer(image: str) -> Path:
    layer = max(manifest_of(image)["layers"], key=lambda d: d["size"])
    if not layer["mediaType"].endswith("gzip"):
        raise SystemExit(f"{image}: its largest layer is {layer['mediaType']}, not gzip")
    return image_dir(image) / "blobs" / Path(*layer["digest"].split(":"))


def child(src: Path, code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="python-ml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-src", type=Path, help="another tree's src/ to inflate the same spans with")
    args = ap.parse_args()
    ensure(args.image)
    blob = largest_layer(args.image)
    trees = {"this tree": (HERE.parent / "src").resolve()}
    if args.baseline_src is not None:
        trees = {"baseline": args.baseline_src.resolve(), **trees}
    with tempfile.TemporaryDirectory(prefix="span-inflate-") as work:
        ztoc = Path(work) / "ztoc"
        build = ("import sys; from lazyoci.soci.shortcuts import build_ztoc; "
                 "open(sys.argv[2], 'wb').write(build_ztoc(open(sys.argv[1], 'rb')))")
        subprocess.run([sys.executable, "-c", build, str(blob), str(ztoc)], check=True,
                       env={**os.environ, "PYTHONPATH": str(trees["this tree"])})
        runs: dict[str, list[dict]] = {name: [] for name in [*trees, "whole layer, one stream (zlib-ng)"]}
        for r in range(args.rounds):
            for name, src in trees.items():
                runs[name].append(child(src, _CHILD, str(ztoc), str(blob)))
            runs["whole layer, one stream (zlib-ng)"].append(child(trees["this tree"], _WHOLE, str(blob)))
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]['cpu_s']:.2f} s ({v[-1]['faults']} faults)"
                                                 for n, v in runs.items()), flush=True)
    size = blob.stat().st_size
    print(f"\n`{' '.join([Path(sys.executable).name, *sys.argv])}`, load {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; layer {blob.name[:12]} "
          f"({size / 1e6:.1f} MB gzip), medians of {args.rounds}:\n")
    print("| inflate | spans | CPU s | page faults | MB/s out |")
    print("|---|---:|---:|---:|---:|")
    for name, rs in runs.items():
        cpu = statistics.median(x["cpu_s"] for x in rs)
        faults = statistics.median(x["faults"] for x in rs)
        spans = rs[0].get("spans", 1)
        print(f"| {name} | {spans} | {cpu:.2f} | {faults:.0f} | {rs[0]['bytes'] / cpu / 1e6:.0f} |")


if __name__ == "__main__":
    main()
