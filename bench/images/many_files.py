"""many-files: about 100,000 small files in one layer, laid out like node_modules;
the workload reads 1% of them and prints `ready`.

The 1% are whole packages (as `require` loads a few dependencies), picked at random
with a fixed seed; their paths are listed in /app/needed.txt.
"""

from __future__ import annotations

import random
from pathlib import Path

from ocibuild import Layout, busybox_tree, fresh_dir, tar_tree

N_FILES = 100_000
CMD = ["/bin/sh", "-c", "xargs cat < /app/needed.txt > /dev/null && echo ready"]

_WORDS = (b"function module exports require return const let var this prototype "
          b"undefined null true false if else for while async await promise then "
          b"callback error value key object array string number length push map").split()


def _source(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(_WORDS, k=12)) + b";\n"
    return bytes(out[:size])


def build(out: Path, work: Path) -> dict:
    tree = fresh_dir(work / "many")
    base = fresh_dir(work / "busybox")
    busybox_tree(base)
    rng = random.Random(6)
    nm = tree / "app/node_modules"
    packages: list[list[tuple[str, int]]] = []
    made = 0
    p = 0
    while made < N_FILES:
        n = min(rng.randint(10, 90), N_FILES - made)
        files = []
        for i in range(n):
            sub = ("lib", "dist", "src")[i % 3]
            rel = f"pkg-{p:05d}/{sub}/file-{i:03d}.js"
            size = int(rng.lognormvariate(7.5, 1.0)) + 64     # median ~1.9 KB, long tail
            path = nm / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_source(rng, size))
            files.append((f"/app/node_modules/{rel}", size))
        (nm / f"pkg-{p:05d}/package.json").write_text(f'{{"name": "pkg-{p:05d}", "version": "1.0.0"}}\n')
        packages.append(files)
        made += n
        p += 1
    # 1% of the files: whole packages chosen at random
    order = list(range(len(packages)))
    rng.shuffle(order)
    needed: list[tuple[str, int]] = []
    for i in order:
        if len(needed) >= N_FILES // 100:
            break
        needed.extend(packages[i])
    (tree / "app/needed.txt").write_text("".join(f"{path}\n" for path, _ in needed))
    layout = Layout(out)
    layout.add_layer(tar_tree(base), "COPY busybox /")
    layout.add_layer(tar_tree(tree), "COPY node_modules/ /app/node_modules/")
    digest = layout.finish(CMD, workdir="/app")
    return {"manifest_digest": digest, "needed_bytes": sum(s for _, s in needed),
            "needed_files": len(needed), "total_files": made,
            "needed_how": "sum of the sizes of the files in /app/needed.txt"}
