"""big-file: one layer of about 1 GiB of mixed compressible and random data in several files;
the workload reads one 100 KiB file (in the middle of the layer) and prints `ready`.

A small busybox layer below it is the runtime (under the SOCI min layer size, so it is
fetched whole, as a real base layer would be).
"""

from __future__ import annotations

import os
from pathlib import Path

from ocibuild import Layout, busybox_tree, fresh_dir, tar_tree

TARGET = "/data/m-pick/config-100k.bin"
TARGET_SIZE = 100 * 1024
CMD = ["/bin/sh", "-c", f"cat {TARGET} > /dev/null && echo ready"]

# 256 levels -> 16 symbols: about 4 bits of entropy a byte, so gzip gets roughly half
_HALF = bytes.maketrans(bytes(range(256)), bytes(b"abcdefghijklmnop"[i % 16] for i in range(256)))


def _write(path: Path, size: int, kind: str) -> None:
    """kind: random (incompressible), text (about 2:1), zeros-ish (very compressible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = 1 << 22
    with open(path, "wb") as f:
        left = size
        n = 0
        while left:
            k = min(chunk, left)
            if kind == "random":
                b = os.urandom(k)
            elif kind == "text":
                b = os.urandom(k).translate(_HALF)
            else:
                b = (f"record {n:012d} ".encode() * (k // 20 + 1))[:k]
            f.write(b)
            left -= k
            n += 1


def build(out: Path, work: Path) -> dict:
    tree = fresh_dir(work / "big")
    base = fresh_dir(work / "busybox")
    busybox_tree(base)
    MiB = 1 << 20
    # names sort so that the 100 KiB target sits between the big files in tar order
    files = [("a-models/weights-0.bin", 192 * MiB, "random"),
             ("a-models/weights-1.bin", 192 * MiB, "random"),
             ("b-logs/train-0.log", 160 * MiB, "text"),
             ("b-logs/train-1.log", 160 * MiB, "text"),
             ("n-embeddings/table.bin", 192 * MiB, "random"),
             ("o-cache/records.dat", 128 * MiB, "zeros")]
    for name, size, kind in files:
        _write(tree / "data" / name, size, kind)
    _write(tree / TARGET.lstrip("/"), TARGET_SIZE, "random")
    layout = Layout(out)
    layout.add_layer(tar_tree(base), "COPY busybox /")
    layout.add_layer(tar_tree(tree), "COPY data/ /data/")
    digest = layout.finish(CMD)
    return {"manifest_digest": digest, "needed_bytes": TARGET_SIZE, "needed_files": 1,
            "needed_how": "the one 100 KiB file the workload reads"}
