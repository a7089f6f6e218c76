"""zTOC build speed: build_ztoc on a >= 512 MiB gzip layer beside `gzip -dc` and `pigz -dc` on the same file.

Usage: .venv/bin/python bench/ztoc_build.py [--repeat N] [--size-mib N]

The layers are generated once (mixed random and text files, compressed by
pigz into one gzip member) and cached under bench/cache/. Each command runs
--repeat times, alternating, and the best wall time is reported with the CPU
time of that run, because the machine may be shared.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from lazyoci.ztoc import Ztoc, build_ztoc, libz  # noqa: E402

CACHE = HERE / "cache"


def _text_pool(seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz_./") for _ in range(rnd.randint(2, 12)))
             for _ in range(5000)]
    return b" ".join(rnd.choice(words) for _ in range(2_000_000))


def make_mixed_layer(path: Path, compressed_mib: int) -> None:
    """Files of log-normal sizes (median ~16 KiB), 40% random bytes, 60% text, until the gzip
    output would pass `compressed_mib` (random compresses ~1:1, this text ~1:3)."""
    rnd = random.Random(1)
    pool = _text_pool(2)
    target = compressed_mib << 20
    estimate = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        pigz = subprocess.Popen(["pigz", "-6", "-c"], stdin=subprocess.PIPE, stdout=out)
        with tarfile.open(fileobj=pigz.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            i = 0
            while estimate < target * 1.04:
                size = min(int(rnd.lognormvariate(9.7, 1.6)), 64 << 20)
                if rnd.random() < 0.4:
                    data, estimate = os.urandom(size), estimate + size
                else:
                    start = rnd.randrange(len(pool) - size) if size < len(pool) else 0
                    data = (pool[start:start + size] * (size // len(pool) + 1))[:size]
                    estimate += size // 3
                ti = tarfile.TarInfo(f"usr/lib/pkg{i % 200}/file{i}.bin")
                ti.size, ti.mtime, ti.mode = len(data), 1_700_000_000, 0o644
                tf.addfile(ti, io.BytesIO(data))
                i += 1
        pigz.stdin.close()
        if pigz.wait() != 0:
            raise SystemExit("pigz failed")
    tmp.rename(path)


def make_small_files_layer(path: Path, count: int) -> None:
    """`count` tiny files: the per-entry cost, where decompression is nothing."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        pigz = subprocess.Popen(["pigz", "-6", "-c"], stdin=subprocess.PIPE, stdout=out)
        with tarfile.open(fileobj=pigz.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            for i in range(count):
                data = b"file %d\n" % i * 20
                ti = tarfile.TarInfo(f"usr/share/doc/pkg{i % 500}/file-{i}.txt")
                ti.size, ti.mtime = len(data), 1_700_000_000
                tf.addfile(ti, io.BytesIO(data))
        pigz.stdin.close()
        pigz.wait()
    tmp.rename(path)


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_command(argv: list[str], path: Path) -> tuple[float, float]:
    c0, t0 = _cpu_children(), time.perf_counter()
    with open(path, "rb") as f:
        subprocess.run(argv, stdin=f, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0, _cpu_children() - c0


def time_build(path: Path, backend: str) -> tuple[float, float, bytes]:
    libz.BACKEND = libz.load_backend(backend)
    c0, t0 = time.process_time(), time.perf_counter()
    with open(path, "rb") as f:
        data = build_ztoc(f, "gzip")
    return time.perf_counter() - t0, time.process_time() - c0, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=520, help="compressed size of the mixed layer")
    ap.add_argument("--small-files", type=int, default=100_000)
    args = ap.parse_args()
    CACHE.mkdir(exist_ok=True)
    layers = [(CACHE / f"ztoc-mixed-{args.size_mib}m.tar.gz", "mixed", lambda p: make_mixed_layer(p, args.size_mib)),
              (CACHE / f"ztoc-small-{args.small_files}.tar.gz", "small files",
               lambda p: make_small_files_layer(p, args.small_files))]
    rows = []
    for path, kind, make in layers:
        if not path.exists():
            print(f"generating {path} ...", file=sys.stderr)
            make(path)
        results: dict[str, list[tuple[float, float]]] = {"zlib-ng": [], "zlib": [], "gzip -dc": [], "pigz -dc": []}
        info = None
        for _ in range(args.repeat):
            built = []
            for backend in ("zlib-ng", "zlib"):
                wall, cpu, data = time_build(path, backend)
                results[backend].append((wall, cpu))
                built.append(data)
            if built[0] != built[1]:
                raise SystemExit("the two inflate backends built different zTOCs")
            info = Ztoc.parse(data), len(data)
            results["gzip -dc"].append(time_command(["gzip", "-dc"], path))
            results["pigz -dc"].append(time_command(["pigz", "-dc"], path))
        z, ztoc_len = info
        best = {k: min(v) for k, v in results.items()}
        rows.append((kind, path.stat().st_size, z.uncompressed_size, len(z), z.num_spans, ztoc_len, best))
    cmd = "bench/ztoc_build.py " + " ".join(sys.argv[1:])
    print(f"command: .venv/bin/python {cmd.strip()}   (best of {args.repeat}; load average at the end: "
          f"{os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; zlib-ng {libz.load_backend('zlib-ng').version}, "
          f"zlib {libz.load_backend('zlib').version})")
    print()
    print("| layer | gzip MiB | tar MiB | files | spans | zTOC KiB | build_ztoc zlib-ng s (cpu) "
          "| build_ztoc zlib s (cpu) | gzip -dc s (cpu) | pigz -dc s (cpu) | build (zlib-ng) / gzip -dc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, csize, usize, files, spans, zlen, best in rows:
        n, z, g, p = best["zlib-ng"], best["zlib"], best["gzip -dc"], best["pigz -dc"]
        print(f"| {kind} | {csize / 2**20:.0f} | {usize / 2**20:.0f} | {files} | {spans} | {zlen / 1024:.0f} | "
              f"{n[0]:.2f} ({n[1]:.2f}) | {z[0]:.2f} ({z[1]:.2f}) | {g[0]:.2f} ({g[1]:.2f}) | "
              f"{p[0]:.2f} ({p[1]:.2f}) | {n[0] / g[0]:.2f} |")


if __name__ == "__main__":
    main()
