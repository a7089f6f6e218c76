#!/usr/bin/env python3
"""The fixed costs of a lazy pull: round trips, bytes, CPU of the CLI and of the service.

    .venv/bin/python bench/pull_cost.py [--runs 5] [--baseline-src DIR] [--profile DIR]

The python3 bench image (bench/images, cached) is pushed to a registry of this run with a SOCI
index (as run_bench.py does), behind bench/throttle_proxy.py at 100 MB/s + 20 ms per request.
Each run, on a fresh data root with the service started before the clock (background fetch
off, as run_bench.py's `soci` mode): `lazyoci pull -q --snapshotter soci REF --soci-index-digest D`.
Reported per run: who pulled (the CLI, or the running service for it: its log says so); wall
seconds; CPU seconds (user+sys) of the pull's own process (wait4) and
of the service and its session holder during the pull (/proc/PID/stat); the requests the
proxy saw, their bytes, and their depth: the longest chain of requests each sent after the
previous one had ended (the round trips the pull waited for one after another).
`--baseline-src DIR` alternates runs with another tree's src/ (`git archive REV src`);
`--profile DIR` runs the pull under cProfile and writes one .pstats per run there;
`--optimized` pulls through an index `lazyoci soci optimize` recorded (prefetch artifacts);
`--full` pulls every layer instead (`--snapshotter overlayfs`, as run_bench.py's `overlayfs` mode);
`--rows` pulls without `-q` (the rows go to /dev/null: every progress event is still made and drawn).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "images"))

from cli_startup import timed  # noqa: E402
import localreg  # noqa: E402
from precompile import compile_lazyoci  # noqa: E402
from process_cpu import cpu_seconds  # noqa: E402
import run_bench  # noqa: E402

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
WORK = HERE / "work" / "pull-cost"
CONFIG = "snapshotters:\n  - soci\nsoci:\n  background_fetch: false\n"


def holder_pid(root: Path) -> int | None:
    try:
        return int((root / "service/holder.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def depth(requests: list[dict]) -> int:
    """The longest chain of requests, each sent after the one before it had been answered."""
    reqs = sorted(requests, key=lambda r: r["start"])
    level: list[int] = []
    for i, r in enumerate(reqs):
        level.append(1 + max((level[j] for j in range(i) if reqs[j]["end"] <= r["start"]), default=0))
    return max(level, default=0)


def one_pull(ref: str, index: str | None, src: Path | None, run_dir: Path, log_file: Path,
             profile: Path | None, rows: bool = False) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    root = run_dir / "root"
    root.mkdir(parents=True)
    cfg = run_dir / "config.yaml"
    cfg.write_text(CONFIG)
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    base = [LAZYOCI, "--root", str(root), "--config", str(cfg)]
    try:
        subprocess.run([*base, "service", "start"], env=env, check=True, capture_output=True)
        service = run_bench.service_pid(root)
        holder = holder_pid(root)
        time.sleep(0.5)                     # the service's own start has settled
        cpu_service0 = cpu_seconds(service) + cpu_seconds(holder)
        seen = log_file.stat().st_size if log_file.exists() else 0
        argv = [*base, "pull", *([] if rows else ["-q"]), "--snapshotter", "soci" if index else "overlayfs", ref,
                *(["--soci-index-digest", index] if index else [])]
        if profile is not None:
            argv = [sys.executable, "-m", "cProfile", "-o", str(profile), *argv]
        t0 = time.time()
        wall, cli_cpu = timed(argv, env)
        cpu_service = cpu_seconds(service) + cpu_seconds(holder) - cpu_service0
        time.sleep(0.1)                     # the proxy's last log line
        # who pulled: a service that runs `lazyoci pull` for the CLI logs "pull of REF ... for pid N"
        in_service = f"pull of {ref} " in (root / "service/lazyoci.log").read_text(errors="replace")
        with open(log_file) as f:
            f.seek(seen)
            reqs = [json.loads(line) for line in f if line.strip()]
        reqs = [r for r in reqs if r["start"] >= t0]
        return {"wall_s": wall, "cli_cpu_s": cli_cpu, "service_cpu_s": cpu_service,
                "pulled_by": "service" if in_service else "CLI",
                "requests": len(reqs), "bytes": sum(r["bytes"] for r in reqs), "depth": depth(reqs),
                "timeline": [(round(r["start"] - t0, 3), round(r["end"] - t0, 3), r["method"],
                              r["path"].rsplit("/", 2)[-2] + "/" + r["path"].rsplit("/", 1)[-1][:19],
                              r["bytes"]) for r in sorted(reqs, key=lambda r: r["start"])]}
    finally:
        subprocess.run([*base, "service", "stop"], env=env, capture_output=True)
        for m in sorted(run_bench.leftover_mounts(root), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline-src", type=Path, default=None, help="alternate with this src/ directory")
    ap.add_argument("--profile", type=Path, default=None, help="write a cProfile of each pull here")
    ap.add_argument("--timeline", action="store_true", help="print each run's requests")
    ap.add_argument("--out", type=Path, default=None, help="also write RESULTS.md and results.json here")
    ap.add_argument("--optimized", action="store_true",
                    help="pull through an index with prefetch artifacts (`soci optimize`, as soci-optimized)")
    ap.add_argument("--full", action="store_true", help="a full pull instead (--snapshotter overlayfs)")
    ap.add_argument("--rows", action="store_true", help="without -q: the progress rows are made (to /dev/null)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("pull_cost.py needs root (FUSE)")
    compile_lazyoci()
    if args.baseline_src:
        compile_lazyoci(args.baseline_src)
    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    commit = run_bench.machine()["commit"]
    load_start = os.getloadavg()[0]
    print(f"command: {command}")
    print(f"commit: {commit}; load average at start: {load_start:.2f}")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    reg = localreg.start_registry(WORK / "registry")
    log_file = WORK / "requests.jsonl"
    proxy = None
    try:
        _, facts = run_bench.prepare_image("python3", reg, WORK / "setup",
                                           ["soci-optimized" if args.optimized else "soci"])
        index = None if args.full else facts["optimized_index" if args.optimized else "index"]
        proxy = localreg.start_proxy(reg.host, 100.0, 20.0, WORK, request_log=log_file)
        ref = f"{proxy.host}/bench/python3:latest"
        trees: list[tuple[str, Path | None]] = [("this tree", None)]
        if args.baseline_src:
            trees.insert(0, ("baseline", args.baseline_src.resolve()))
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        results: dict[str, list[dict]] = {name: [] for name, _ in trees}
        for i in range(args.runs):
            for name, src in trees:
                prof = args.profile / f"{name.replace(' ', '-')}-{i + 1}.pstats" if args.profile else None
                r = one_pull(ref, index, src, WORK / "run", log_file, prof, args.rows)
                results[name].append(r)
                print(f"{name} #{i + 1}: pulled by the {r['pulled_by']}, wall {r['wall_s']:.3f} s, "
                      f"CLI cpu {r['cli_cpu_s']:.3f} s, service cpu "
                      f"{r['service_cpu_s']:.2f} s, {r['requests']} requests, depth {r['depth']}, "
                      f"{r['bytes'] / 1e6:.2f} MB (load {os.getloadavg()[0]:.2f})", flush=True)
                if args.timeline:
                    for t in r["timeline"]:
                        print("   ", *t)
        lines = [f"command: {command}", f"commit: {commit}; load average {load_start:.2f} at the start, "
                 f"{os.getloadavg()[0]:.2f} at the end; {os.cpu_count()} CPUs; medians of {args.runs} runs", "",
                 "| tree | pulled by | pull wall s | CLI CPU s | service CPU s | requests | round trips (depth) | MB |",
                 "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, runs in results.items():
            med = {k: statistics.median(r[k] for r in runs)
                   for k in ("wall_s", "cli_cpu_s", "service_cpu_s", "requests", "depth", "bytes")}
            by = "/".join(sorted({r["pulled_by"] for r in runs}))
            lines.append(f"| {name} | {by} | {med['wall_s']:.3f} | {med['cli_cpu_s']:.3f} | {med['service_cpu_s']:.2f} | "
                         f"{med['requests']:g} | {med['depth']:g} | {med['bytes'] / 1e6:.2f} |")
        print("\n" + "\n".join(lines))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
            (args.out / "results.json").write_text(json.dumps(
                {"command": command, "commit": commit, "loadavg_at_start": load_start, "runs": results}, indent=1))
    finally:
        if proxy is not None:
            proxy.stop()
        reg.stop()


if __name__ == "__main__":
    main()
