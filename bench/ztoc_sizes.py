#!/usr/bin/env python3
"""zTOC bytes of the bench images, with and without long spans inside large files.

    .venv/bin/python bench/ztoc_sizes.py [--images python3,big-file,many-files,python-ml]

Builds the zTOC of every layer of 10 MiB or more (the SOCI minimum) of each cached image
(bench/cache/<name>, built by bench/images/build.py) at 4 MiB spans everywhere, at 4 MiB with
spans of up to 16 MiB inside large files (lazyoci's default, ztoc/span_layout.py) and at 2 MiB
with them, and prints a table: zTOC bytes and spans per layer and per image. A lazy pull fetches
every zTOC whole, so these are bytes every lazy start of the image pays.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lazyoci.ztoc import Ztoc, build_ztoc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "images"))

from build import manifest_of  # noqa: E402
MiB = 1 << 20
LAYOUTS = ((4 * MiB, 0, "4 MiB everywhere"), (4 * MiB, 16 * MiB, "4 MiB, 16 MiB in large files"),
           (2 * MiB, 16 * MiB, "2 MiB, 16 MiB in large files"))


def layers(name: str) -> list[dict]:
    return [l for l in manifest_of(name)["layers"] if l["size"] >= 10 * MiB]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="python3,big-file,many-files,python-ml")
    args = ap.parse_args()
    print(f"command: python bench/ztoc_sizes.py {' '.join(sys.argv[1:])}; load average {os.getloadavg()[0]:.1f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| image | layer | compressed MB | " + " | ".join(f"{name}: zTOC MB (spans)" for *_, name in LAYOUTS) + " |")
    print("|---|---|---:|" + "---:|" * len(LAYOUTS))
    for name in args.images.split(","):
        image = HERE / "cache" / name
        if not (image / "index.json").exists():
            print(f"| {name} | not built (bench/images/build.py {name}) |")
            continue
        totals = [[0, 0] for _ in LAYOUTS]
        for layer in layers(name):
            cells = []
            for k, (span, large, _) in enumerate(LAYOUTS):
                with open(image / "blobs/sha256" / layer["digest"].split(":")[1], "rb") as f:
                    data = build_ztoc(f, "gzip", span, large_span_size=large)
                spans = Ztoc.parse(data).num_spans
                totals[k][0] += len(data)
                totals[k][1] += spans
                cells.append(f"{len(data) / 1e6:.2f} ({spans})")
            print(f"| {name} | {layer['digest'][7:19]} | {layer['size'] / 1e6:.1f} | " + " | ".join(cells) + " |",
                  flush=True)
        print(f"| {name} | **all** | | " + " | ".join(f"**{b / 1e6:.2f}** ({n})" for b, n in totals) + " |",
              flush=True)


if __name__ == "__main__":
    main()
