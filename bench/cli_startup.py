"""CLI start-up: how long `lazyoci` takes before it does anything, and `run`'s time to runc.

    .venv/bin/python bench/cli_startup.py                 # warm: median of 10 runs per command
    .venv/bin/python bench/cli_startup.py --cold           # one run per command after dropping the page cache
    .venv/bin/python bench/cli_startup.py --run           # `run --rm` of a pulled image: time to `runc run`
    .venv/bin/python bench/cli_startup.py --src DIR       # measure another tree's src/ (e.g. `git archive main`)

Wall seconds and the command's CPU seconds (user+sys, from wait4): on a shared machine the
CPU figure moves much less than the wall one. `--cold` drops the page cache (root; it slows
every other process for a moment, so use it sparingly). Data root: an empty temporary
directory; no config file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from precompile import compile_lazyoci

HERE = Path(__file__).resolve().parent
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
COMMANDS = [["--version"], ["--help"], ["ps"], ["images"], ["pull", "--help"]]

# Put first on PATH for `--run`: notes when `runc run` starts and the CPU ticks spent by then
# by the monitor (its parent) and by `lazyoci run` (the monitor's parent), then runs runc.
RUNC_WRAPPER = """#!/bin/sh
if [ "$3" = "run" ]; then
  mon=$PPID
  lz=$(awk '{print $4}' /proc/$mon/stat)
  echo "$(date +%s.%N) $(awk '{print $14+$15}' /proc/$lz/stat) $(awk '{print $14+$15}' /proc/$mon/stat)" >> "$RUNC_STAMP"
fi
exec REAL_RUNC "$@"
"""


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run (stdout discarded; it must succeed)."""
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env,
                         file_actions=[(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)])
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    return wall, usage.ru_utime + usage.ru_stime


def drop_caches() -> None:
    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)


def commands(env: dict[str, str], cold: bool, runs: int) -> None:
    print("| command | wall s | cpu s |\n|---|---|---|")
    for args in COMMANDS:
        if cold:
            drop_caches()
            wall, cpu = timed([LAZYOCI, *args], env)
        else:
            timed([LAZYOCI, *args], env)                        # warm the page cache
            samples = [timed([LAZYOCI, *args], env) for _ in range(runs)]
            wall, cpu = statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)
        print(f"| `lazyoci {' '.join(args)}` | {wall:.3f} | {cpu:.3f} |")


def run_handoff(env: dict[str, str], runs: int, work: Path) -> None:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers.tricky_image import build_tricky_image   # a busybox image made without lazyoci
    from localreg import skopeo_push_layout, start_registry

    real_runc = subprocess.run(["sh", "-c", "command -v runc"], capture_output=True, text=True).stdout.strip()
    fakebin = work / "bin"
    fakebin.mkdir()
    (fakebin / "runc").write_text(RUNC_WRAPPER.replace("REAL_RUNC", real_runc))
    (fakebin / "runc").chmod(0o755)
    stamp = work / "stamp"
    env = {**env, "PATH": f"{fakebin}:{env['PATH']}", "RUNC_STAMP": str(stamp)}
    registry = start_registry(work / "registry")
    try:
        (work / "image").mkdir()
        image = build_tricky_image(work / "image", "latest")
        ref = f"{registry.host}/bench/startup:latest"
        skopeo_push_layout(image.layout, ref)
        p = subprocess.run([LAZYOCI, "pull", "-q", ref], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"pull failed: {p.stderr.strip()}")
        walls, cpus = [], []
        for i in range(runs + 1):
            stamp.write_text("")
            start = time.time()
            subprocess.run([LAZYOCI, "run", "--rm", ref, "/bin/true"], env=env, check=True, capture_output=True)
            at, lazyoci_ticks, monitor_ticks = stamp.read_text().split()
            if i:                                               # the first run warms the page cache
                walls.append(float(at) - start)
                cpus.append((int(lazyoci_ticks) + int(monitor_ticks)) / os.sysconf("SC_CLK_TCK"))
        print(f"`lazyoci run --rm IMAGE /bin/true` (image pulled) to the exec of `runc run`, median of {runs}: "
              f"wall {statistics.median(walls):.3f} s, cpu {statistics.median(cpus):.2f} s "
              "(lazyoci + its monitor, 10 ms ticks)")
    finally:
        registry.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each command")
    parser.add_argument("--run", action="store_true", help="measure `run`'s hand-off to runc instead")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--src", type=Path, default=None, help="import lazyoci from this src/ directory")
    args = parser.parse_args()
    compile_lazyoci(args.src)
    with tempfile.TemporaryDirectory(prefix="lazyoci-startup-") as tmp:
        work = Path(tmp)
        # no config file: none named, and a HOME without ~/.lazyoci
        env = {**{k: v for k, v in os.environ.items() if k != "LAZYOCI_CONFIG"},
               "LAZYOCI_ROOT": str(work / "root"), "HOME": str(work)}
        if args.src:
            env["PYTHONPATH"] = str(args.src.resolve())
        print(f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
        if args.run:
            run_handoff(env, args.runs, work)
        else:
            commands(env, args.cold, args.runs)
        print(f"load average at the end: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
