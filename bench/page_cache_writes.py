#!/usr/bin/env python3
"""What writing new data into the page cache costs this machine, by the size of each write.

    .venv/bin/python bench/page_cache_writes.py [--mib 400] [--sizes 4M,1M,256K,64K] [--rounds 2]

On an ext4 filesystem of its own (a sparse image on a loop device, as `run_bench.py --fresh-fs`
makes for every run), writes --mib MiB of random bytes to a new file in writes of each size,
4 MiB-aligned pieces as the span cache writes its spans, sizes alternating; before each, drops the
page cache and waits, so every write lands in memory freed a while ago. Prints the system CPU and
wall time of each. On a virtual machine whose balloon takes free memory back from the guest (free
page reporting), touching such memory costs a fault into the host per page: the figure to keep
in mind when a bench run's system CPU moves between runs of the same code.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_bench import mount_fresh_filesystem, unmount_fresh_filesystem  # noqa: E402

_UNITS = {"K": 1 << 10, "M": 1 << 20}


def size_of(text: str) -> int:
    return int(text[:-1]) * _UNITS[text[-1]] if text[-1] in _UNITS else int(text)


def write_new(path: Path, total: int, piece: int, chunk: int) -> tuple[float, float]:
    """Write `total` bytes to a new file in `chunk`-byte writes; (system CPU s, wall s)."""
    data = memoryview(os.urandom(piece))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, total)
        before, t = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        for base in range(0, total, piece):
            for off in range(0, piece, chunk):
                os.pwrite(fd, data[off:off + chunk], base + off)
        wall = time.monotonic() - t
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        os.close(fd)
    path.unlink()
    return after.ru_stime - before.ru_stime, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=400)
    ap.add_argument("--sizes", default="4M,1M,256K,64K")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settle", type=float, default=6.0, help="seconds to wait after dropping the page cache")
    args = ap.parse_args()
    sizes = [size_of(s) for s in args.sizes.split(",")]
    total, piece = args.mib << 20, 4 << 20
    try:
        order = int(Path("/sys/module/page_reporting/parameters/page_reporting_order").read_text())
        reporting = f"free page reporting order {order}: free blocks of {4 << order} KiB and up go back to the host"
    except (OSError, ValueError):
        reporting = "no free page reporting"
    print(f"    command: python bench/page_cache_writes.py --mib {args.mib} --sizes {args.sizes} "
          f"--rounds {args.rounds}   (load average {os.getloadavg()[0]:.1f}; {reporting})\n")
    print("| write size | round | system CPU s | wall s | system CPU ms per MiB |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="page-cache-writes-", dir=HERE / "work") as tmp:
        where = Path(tmp) / "fs"
        fresh = mount_fresh_filesystem(where)
        try:
            for r in range(1, args.rounds + 1):
                for chunk in sizes:
                    os.sync()
                    Path("/proc/sys/vm/drop_caches").write_text("3\n")
                    time.sleep(args.settle)
                    cpu, wall = write_new(where / "data", total, piece, min(chunk, piece))
                    print(f"| {chunk >> 10} KiB | {r} | {cpu:.2f} | {wall:.2f} | {cpu * 1e3 / args.mib:.2f} |")
        finally:
            unmount_fresh_filesystem(where, fresh)


if __name__ == "__main__":
    main()
