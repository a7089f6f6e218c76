#!/usr/bin/env python3
"""Warm reads through the lazy filesystem against the same `run` from an overlayfs unpack.

    .venv/bin/python bench/warm_reads.py [--image python-ml] [--rounds 5] [--src DIR]

One registry on loopback (no throttle: only the reads after the fetch are timed). Two data roots:
`full` pulls the image with the overlayfs snapshotter (a full unpack); `lazy` pulls it with the
soci snapshotter and lets the background fetcher bring in every span. Then, `--rounds` times,
alternating which goes first, `lazyoci run --rm` of each is timed from its start to the `ready`
line. Round 1 of the lazy image runs straight after the background fetch (what `run_bench.py`'s
soci-bg mode times); every later lazy round first restarts the service with `service stop` and
`service start` (before the clock), so the FUSE mount is new and the kernel holds none of its
entries or pages: every lookup and read goes to the service again, served from the span cache
(whose file stays in the page cache, as after the fetch). The overlayfs root's files stay in the
page cache between rounds, as after an unpack.

`--needed-only`: no background fetch; an untimed lazy `run` first brings in the spans the
workload reads, so every lazy round reads from a span cache that holds those and no more (the
layers stay incomplete: what a lazy start with a settled recorded prefetch reads from).

`--restart` runs `service restart` instead (a new service process on the mount the holder keeps:
the kernel keeps its entries and pages); `--same-mount` no restart at all.

Per run: wall seconds to `ready`, CPU seconds (user+sys) of the lazyoci service and of the FUSE
session holder during the run, and the FUSE messages the holder relayed or answered itself, per
opcode (a holder that counts them). `--src DIR` runs another tree's `src/` (e.g. `git archive main
src`) for a before/after. `--py-spy DIR` profiles the service and the holder (`--native`: with
their C and system-call frames).
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

import localreg  # noqa: E402
from precompile import compile_lazyoci  # noqa: E402
from process_cpu import cpu_seconds  # noqa: E402
import run_bench as rb  # noqa: E402

WORK = HERE / "work" / "warm-reads"


def pid_of(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


OPCODES = {1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 5: "READLINK", 14: "OPEN", 15: "READ", 17: "STATFS",
           18: "RELEASE", 22: "GETXATTR", 23: "LISTXATTR", 25: "FLUSH", 26: "INIT", 27: "OPENDIR",
           28: "READDIR", 29: "RELEASEDIR", 34: "ACCESS", 36: "INTERRUPT", 39: "IOCTL", 42: "BATCH_FORGET",
           44: "READDIRPLUS"}


def holder_status(root: Path) -> dict:
    """The session holder's status reply (empty if it cannot be had)."""
    import socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(2)
            s.connect(str(root / "service/holder.sock"))
            s.send(b'{"op": "status"}')
            return json.loads(s.recv(65536))
    except (OSError, ValueError):
        return {}


def holder_opcodes(root: Path) -> dict[str, list[int]]:
    """Per opcode name: [requests relayed to the service, answered by the holder] so far (empty
    from a holder that does not count them)."""
    return {OPCODES.get(int(k), k): v for k, v in holder_status(root).get("opcodes", {}).items()}


def holder_service_seconds(root: Path) -> dict[str, float]:
    """Per opcode name: the seconds its relayed requests have waited for the service so far."""
    return {OPCODES.get(int(k), k): v for k, v in holder_status(root).get("service_seconds", {}).items()}


def holder_counts(root: Path) -> tuple[int, int] | None:
    """FUSE requests the session holder has answered so far: (all, of which it answered itself
    without the service). None if it does not say."""
    status = holder_status(root)
    try:
        answered = int(status.get("answered", 0))
        return int(status["relayed"]) + answered, answered
    except (ValueError, KeyError):
        return None


def renice(root: Path, value: int) -> None:
    for name in ("lazyoci.pid", "holder.pid"):
        pid = pid_of(root / "service" / name)
        if pid:
            os.setpriority(os.PRIO_PROCESS, pid, value)


def set_read_ahead(mountpoint: Path, kib: int) -> None:
    dev = os.stat(mountpoint).st_dev
    Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").write_text(f"{kib}\n")


def timed_run(root: Path, cfg: Path, snap: str, ref: str, log_file: Path, env: dict,
              profile: Path | None = None, native: bool = False) -> dict:
    svc = pid_of(root / "service/lazyoci.pid")
    holder = pid_of(root / "service/holder.pid")
    spies = []
    if profile is not None and svc:
        for pid, out in ((svc, profile), (holder, profile.with_name(profile.stem + "-holder.txt"))):
            if pid:
                spies.append(subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record",
                                               "--format", "raw", "-r", "500", "-o", str(out), "-p", str(pid),
                                               *(["--native"] if native else [])],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)        # attached before the clock
    c0, h0, r0, o0 = cpu_seconds(svc), cpu_seconds(holder), holder_counts(root), holder_opcodes(root)
    w0 = holder_service_seconds(root)
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    p = subprocess.Popen([rb.LAZYOCI, "--root", str(root), "--config", str(cfg), "run", "--rm",
                          "--snapshotter", snap, ref],
                         stdout=subprocess.PIPE, stderr=open(log_file, "ab"), env=env)
    ready = None
    assert p.stdout is not None
    for line in p.stdout:
        if line.strip() == b"ready" and ready is None:
            ready = time.monotonic() - t0
    rc = p.wait(timeout=900)
    if rc != 0 or ready is None:
        raise RuntimeError(f"run exited {rc}: {log_file.read_text(errors='replace')[-600:]}")
    r1, o1, w1 = holder_counts(root), holder_opcodes(root), holder_service_seconds(root)
    waited = {k: round(v - w0.get(k, 0.0), 4) for k, v in w1.items() if v - w0.get(k, 0.0) > 0}
    opcodes = {k: [v[0] - o0.get(k, [0, 0])[0], v[1] - o0.get(k, [0, 0])[1]] for k, v in o1.items()}
    for spy in spies:
        spy.send_signal(2)
        spy.wait(60)
    return {"ready_s": ready, "service_cpu_s": cpu_seconds(svc) - c0, "holder_cpu_s": cpu_seconds(holder) - h0,
            "fuse_messages": (r1[0] - r0[0]) if r0 is not None and r1 is not None else None,
            "holder_answered": (r1[1] - r0[1]) if r0 is not None and r1 is not None else None,
            "opcodes": {k: v for k, v in opcodes.items() if v != [0, 0]},
            "service_seconds": waited,
            "loadavg": round(load, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="python-ml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--src", type=Path, default=None, help="another tree's src/ to run")
    ap.add_argument("--out", type=Path, default=None, help="write results.json here")
    ap.add_argument("--same-mount", action="store_true",
                    help="no service restart between lazy runs: the kernel keeps the mount's entries and pages")
    ap.add_argument("--restart", action="store_true",
                    help="`service restart` between lazy runs: a new service process on the same mount (the holder "
                         "keeps it, and the kernel its entries and pages)")
    ap.add_argument("--needed-only", action="store_true",
                    help="no background fetch: an untimed lazy run first brings in what the workload reads")
    ap.add_argument("--nice", type=int, default=None,
                    help="give the service's and the holder's main threads this nice value after each start")
    ap.add_argument("--keep", action="store_true", help="keep the data roots (services stopped) under bench/work")
    ap.add_argument("--read-ahead-kb", type=int, default=None,
                    help="set the FUSE mount's read-ahead (its bdi's read_ahead_kb) after each service start")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                    help="profile the service and the holder during each lazy run (py-spy, folded stacks in DIR)")
    ap.add_argument("--native", action="store_true", help="with --py-spy: the native frames too (C, kernel calls)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("warm_reads.py needs root (overlayfs, FUSE, runc)")
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = str(args.src.resolve())
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]      # rb.lazyoci's children inherit it
    compile_lazyoci(args.src)
    command = "python bench/warm_reads.py " + " ".join(sys.argv[1:])
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    reg = localreg.start_registry(WORK / "registry")
    roots = {"full": WORK / "full", "lazy": WORK / "lazy"}
    cfgs = {k: WORK / f"{k}.yaml" for k in roots}
    cfgs["full"].write_text(rb.config_text("overlayfs"))
    cfgs["lazy"].write_text(rb.config_text("soci" if args.needed_only else "soci-bg"))
    snap = {"full": "overlayfs", "lazy": "soci"}
    log_file = WORK / "cli.log"
    runs: list[dict] = []
    try:
        repo, facts = rb.prepare_image(args.image, reg, WORK / "setup", ["soci-bg"])
        ref = f"{reg.host}/{repo}"
        for k, root in roots.items():
            root.mkdir()
        rb.lazyoci(roots["full"], cfgs["full"], "pull", "-q", ref, log_file=log_file)
        rb.lazyoci(roots["lazy"], cfgs["lazy"], "service", "start", log_file=log_file)
        rb.lazyoci(roots["lazy"], cfgs["lazy"], "pull", "-q", "--snapshotter", "soci", ref,
                   *(["--soci-index-digest", facts["index"]] if facts.get("index") else []), log_file=log_file)
        if args.nice is not None:
            renice(roots["lazy"], args.nice)
        if args.needed_only:
            first = timed_run(roots["lazy"], cfgs["lazy"], "soci", ref, log_file, env)
            rb.log(f"the workload's spans brought in by a first lazy run ({first['ready_s']:.2f}s)")
        else:
            bg, unpacked = rb.wait_background(roots["lazy"], cfgs["lazy"], timeout=3600)
            rb.log(f"background fetch done {bg:.1f}s after the pull"
                   + (f", its layers unpacked {unpacked:.1f}s after it" if unpacked is not None else ""))
        for i in range(args.rounds):
            order = ("lazy", "full") if i % 2 == 0 else ("full", "lazy")
            for kind in order:
                if kind == "lazy" and i > 0 and args.restart:
                    rb.lazyoci(roots["lazy"], cfgs["lazy"], "service", "restart", log_file=log_file)
                    if args.nice is not None:
                        renice(roots["lazy"], args.nice)
                elif kind == "lazy" and (i > 0 or args.needed_only) and not args.same_mount:
                    rb.lazyoci(roots["lazy"], cfgs["lazy"], "service", "stop", log_file=log_file)
                    rb.lazyoci(roots["lazy"], cfgs["lazy"], "service", "start", log_file=log_file)
                    if args.nice is not None:
                        renice(roots["lazy"], args.nice)
                    if args.read_ahead_kb:
                        set_read_ahead(roots["lazy"] / "service/mnt", args.read_ahead_kb)
                rec = {"round": i + 1, "kind": kind,
                       "state": "after the fetch" if kind == "lazy" and i == 0 and not args.needed_only else
                                (("same mount" if args.same_mount else "service restarted" if args.restart
                                  else "new mount") if kind == "lazy"
                                 else "page cache")}
                spy = args.py_spy / f"service-round{i + 1}.txt" if args.py_spy and kind == "lazy" \
                    else None
                if spy is not None:
                    args.py_spy.mkdir(parents=True, exist_ok=True)
                rec.update(timed_run(roots[kind], cfgs[kind], snap[kind], ref, log_file, env, spy, args.native))
                rb.log(f"round {i + 1} {kind}: ready {rec['ready_s']:.2f}s, service cpu "
                       f"{rec['service_cpu_s']:.2f}s, holder cpu {rec['holder_cpu_s']:.2f}s, "
                       f"{rec['fuse_messages']} FUSE messages ({rec['holder_answered']} answered by the holder), "
                       f"load {rec['loadavg']}")
                runs.append(rec)
    finally:
        for k, root in roots.items():
            if root.exists():
                rb.lazyoci(root, cfgs[k], "service", "stop", check=False, timeout=120, log_file=log_file)
                for m in sorted(rb.leftover_mounts(root), key=len, reverse=True):
                    subprocess.run(["umount", "-l", m], check=False)
        reg.stop()
    report(command, commit, runs, args.out, args.needed_only)
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)


def report(command: str, commit: str, runs: list[dict], out: Path | None, needed_only: bool = False) -> None:
    def med(kind: str, key: str, state: str | None = None) -> float | None:
        vals = [r[key] for r in runs if r["kind"] == kind and r.get(key) is not None
                and (state is None or r["state"] == state)]
        return statistics.median(vals) if vals else None

    def f(v: float | None, spec: str = ".2f") -> str:
        return "—" if v is None else format(v, spec)

    loads = [r["loadavg"] for r in runs]
    print(f"\n    command: {command}   (lazyoci at {commit}; load average {min(loads):.1f}-{max(loads):.1f})\n")
    print("| run of | runs | run→ready s (median) | each run s | service CPU s | holder CPU s | FUSE messages "
          "| of which the holder answered |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    rows = [("overlayfs unpack (page cache)", "full", None),
            ("lazy, right after the background fetch", "lazy", "after the fetch"),
            ("lazy, new mount, span cache complete" if not needed_only else
             "lazy, new mount, the workload's spans cached", "lazy", "new mount"),
            ("lazy, again on the same mount", "lazy", "same mount"),
            ("lazy, after `service restart` (same mount)", "lazy", "service restarted")]
    for label, kind, state in rows:
        sel = [r for r in runs if r["kind"] == kind and (state is None or r["state"] == state)]
        if not sel:
            continue
        print(f"| {label} | {len(sel)} | {f(med(kind, 'ready_s', state))} | "
              f"{', '.join(f(r['ready_s']) for r in sel)} | {f(med(kind, 'service_cpu_s', state))} | "
              f"{f(med(kind, 'holder_cpu_s', state))} | {f(med(kind, 'fuse_messages', state), '.0f')} | "
              f"{f(med(kind, 'holder_answered', state), '.0f')} |")
    last = next((r for r in reversed(runs) if r["kind"] == "lazy" and r.get("opcodes")), None)
    if last is not None:
        print(f"\nFUSE requests of the last lazy run ({last['state']}), relayed to the service / answered by "
              "the holder:\n")
        print("| opcode | relayed | holder | relayed ones waited for the service, s |\n|---|---:|---:|---:|")
        waited = last.get("service_seconds", {})
        for name, (relayed, answered) in sorted(last["opcodes"].items(), key=lambda kv: -sum(kv[1])):
            print(f"| {name} | {relayed} | {answered} | {waited.get(name, 0.0):.3f} |")
    full, lazy = med("full", "ready_s"), med("lazy", "ready_s")
    if full and lazy:
        print(f"\nlazy / full (medians of every round): {lazy / full:.2f}")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"command": command, "commit": commit, "runs": runs},
                                                     indent=1))


if __name__ == "__main__":
    main()
