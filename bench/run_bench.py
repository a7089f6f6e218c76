#!/usr/bin/env python3
"""`make bench`: full pull vs SOCI lazy loading on realistic images behind a throttled registry.

    .venv/bin/python bench/run_bench.py [--images python-ml,big-file,many-files]
        [--profiles 100MBps-20ms,20MBps-50ms] [--modes overlayfs,soci,estargz,zstd-chunked] [--runs 3]

For each image, profile and mode, on a fresh data root every run:
  0. (lazy modes) `lazyoci service start`, before the clock (its time is reported apart)
  1. `lazyoci pull --snapshotter S REF`                 -> pull time
  2. (soci-bg only) wait until the service's background fetcher has every span;
     (soci-optimized-settled only) wait until the recorded prefetch has every span it names
  3. `lazyoci run --rm --snapshotter S REF`             -> time from its start to the `ready` line
Measured at the same time: bytes and requests the registry served (counted by the proxy),
the lazyoci service's peak RSS (VmHWM from /proc), medians over the runs. The estargz and
zstd-chunked modes run the same image converted by the real producers (bench/layer_formats.py)
lazily through the layers' own TOCs. The floor is the
bytes the workload really reads divided by the bandwidth. Results: bench/results/RESULTS.md,
results.json and chart.png. The images are built once (bench/images/build.py) and cached.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "images"))

import layer_formats  # noqa: E402
import localreg  # noqa: E402
from build import BUILDERS, ensure, image_dir, manifest_of  # noqa: E402
from precompile import compile_lazyoci  # noqa: E402

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
PROFILES = {"100MBps-20ms": (100.0, 20.0), "20MBps-50ms": (20.0, 50.0)}
MODES = ("overlayfs", "overlayfs-sync", "soci", "soci-optimized", "soci-optimized-settled", "soci-bg",
         "estargz", "zstd-chunked")
# what `make bench` runs; the others take a figure apart
DEFAULT_MODES = tuple(m for m in MODES if m not in ("overlayfs-sync", "soci-optimized-settled"))
MODE_LABEL = {"overlayfs": "overlayfs (full pull)",
              "overlayfs-sync": "overlayfs (full pull), each layer flushed to disk (unpack_sync_fs)",
              "soci": "soci lazy",
              "soci-optimized": "soci lazy, recorded prefetch (soci optimize)",
              "soci-optimized-settled": "soci lazy, `run` once the recorded prefetch has ended",
              "soci-bg": "soci, background fetch finished",
              "estargz": "eStargz lazy (--snapshotter stargz)",
              "zstd-chunked": "zstd:chunked lazy (--snapshotter soci, no SOCI index)"}
SNAPSHOTTER = {"overlayfs": "overlayfs", "overlayfs-sync": "overlayfs", "estargz": "stargz"}   # others: soci
WORK = HERE / "work"
FRESH_FS_BYTES = 16 << 30       # --fresh-fs: each run's filesystem (sparse: only what the run writes)
RESULTS = HERE / "results"      # --out changes it


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def config_text(mode: str) -> str:
    """Finch-style config per mode. Lazy mode turns the background fetcher off so the bytes
    counted are the ones the workload pulls in; soci-bg lets it run at once and flat out."""
    if mode == "overlayfs":
        return "snapshotters:\n  - overlayfs\n"
    if mode == "overlayfs-sync":
        return "snapshotters:\n  - overlayfs\nunpack_sync_fs: true\n"
    if mode in ("soci", "soci-optimized", "soci-optimized-settled", "estargz", "zstd-chunked"):
        return f"snapshotters:\n  - {SNAPSHOTTER.get(mode, 'soci')}\nsoci:\n  background_fetch: false\n"
    return ("snapshotters:\n  - soci\nsoci:\n  background_fetch: true\n"
            "  background_quiet_seconds: 0\n  background_interval_ms: 0\n")


def lazyoci(root: Path, cfg: Path, *args: str, timeout: float = 1800, check: bool = True,
            log_file: Path | None = None) -> subprocess.CompletedProcess:
    """Run one lazyoci command and wait for it to end; killed after `timeout` seconds.

    The wait blocks in waitpid: `subprocess.run(timeout=)` polls the child with sleeps that grow
    to 50 ms, so every timed pull ended on that poll, up to 50 ms after the command had (`lazyoci
    --version`, 95 ms, measured 115 ms that way)."""
    cmd = [LAZYOCI, "--root", str(root), "--config", str(cfg), *args]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    try:
        p = subprocess.Popen(cmd, stdout=out, stderr=out)
        killed = threading.Event()
        watchdog = threading.Timer(timeout, lambda: (killed.set(), p.kill()))
        watchdog.start()
        try:
            rc = p.wait()
        finally:
            watchdog.cancel()
    finally:
        if log_file:
            out.close()
    if killed.is_set():
        raise subprocess.TimeoutExpired(cmd, timeout)
    if check and rc != 0:
        tail = log_file.read_text(errors="replace")[-800:] if log_file else ""
        raise RuntimeError(f"{' '.join(cmd[5:])} exited {rc}: {tail}")
    return subprocess.CompletedProcess(cmd, rc)


def service_pid(root: Path) -> int | None:
    pid_file = root / "service/lazyoci.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def proc_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """Peak RSS of the service: VmHWM (the kernel's high-water mark) read every 100 ms,
    so a service started mid-run is caught too."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak_kib = 0
        self.stop_evt = threading.Event()

    def run(self) -> None:
        while not self.stop_evt.is_set():
            self.sample()
            self.stop_evt.wait(0.1)

    def sample(self) -> None:
        pid = service_pid(self.root)
        if pid:
            kib = proc_kib(pid, "VmHWM") or proc_kib(pid, "VmRSS") or 0
            self.peak_kib = max(self.peak_kib, kib)

    def finish(self) -> int:
        self.sample()
        self.stop_evt.set()
        self.join(2)
        return self.peak_kib


UNPACK_ENDED = ("unpacked", "failed", "parked")


def wait_background(root: Path, cfg: Path, timeout: float) -> tuple[float, float | None]:
    """Seconds until every lazy layer reports 100% fetched, and until every zTOC layer's unpack
    from the span cache has ended too (None from a service that does not unpack; the library's
    service client)."""
    from lazyoci.service.client import ServiceClient
    from lazyoci.store.layout import DataRoot

    client = ServiceClient(DataRoot(root), cfg)
    t0 = time.monotonic()
    fetched: float | None = None
    while time.monotonic() - t0 < timeout:
        st = client.status()
        layers = st.get("layers") or []
        if fetched is None and layers and all(l["fetched_bytes"] >= l["total_bytes"] for l in layers):
            fetched = time.monotonic() - t0
        if fetched is not None:
            unpacking = [l for l in layers if "unpack" in l and l.get("format", "soci") == "soci"]
            if not unpacking:
                return fetched, None
            if all(l["unpack"] in UNPACK_ENDED for l in unpacking):
                return fetched, time.monotonic() - t0
        time.sleep(0.25)
    raise RuntimeError(f"background fetch not finished after {timeout:.0f}s")


def wait_prefetched(root: Path, cfg: Path, timeout: float) -> float:
    """Seconds until every lazy layer's recorded prefetch has every span it names (fetched or failed)."""
    from lazyoci.service.client import ServiceClient
    from lazyoci.store.layout import DataRoot

    client = ServiceClient(DataRoot(root), cfg)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        layers = client.status().get("layers") or []
        if layers and all(l.get("prefetch_done", 0) >= l.get("prefetch_spans", 0) for l in layers):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"recorded prefetch not finished after {timeout:.0f}s")


def leftover_mounts(root: Path) -> list[str]:
    prefix = str(root.resolve())
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def service_figures(root: Path) -> dict:
    """What the service says of its lazy layers after a run: compressed bytes fetched, of which
    spans no read used, spans fetched, of which spans only tar header checks read, when the last
    layer was mounted and when the first read came (wall times; absent when it does not say);
    and the FUSE session holder: the requests it answered itself and those it relayed to the
    service, by opcode, and how long the relayed ones waited for the service's replies."""
    from lazyoci.service.client import ServiceClient
    from lazyoci.service.holder_link import HolderPaths, holder_status
    from lazyoci.store.layout import DataRoot
    client = ServiceClient(DataRoot(root))
    if not client.is_running():
        return {}
    layers = client.status()["layers"]
    reads = [l["first_read_at"] for l in layers if l.get("first_read_at")]
    holder = holder_status(HolderPaths(client.paths.dir)) or {}
    return {"holder_opcodes": holder.get("opcodes"),
            "holder_service_seconds": holder.get("service_seconds"),
            "service_requests": sum(v[0] for v in holder["opcodes"].values()) if "opcodes" in holder else None,
            "service_wait_s": sum(holder["service_seconds"].values()) if "service_seconds" in holder else None,
            "service_lookups": holder.get("opcodes", {}).get("1", [None, None])[0],
            "service_lookup_wait_s": holder.get("service_seconds", {}).get("1"),
            "holder_reads": holder.get("opcodes", {}).get("15", [None, None])[1],
            "service_reads": holder.get("opcodes", {}).get("15", [None, None])[0],
            "lazy_network_bytes": sum(l["network_bytes"] for l in layers),
            "unread_bytes": sum(l.get("unread_bytes", 0) for l in layers),
            "neighbor_spans": sum(l.get("neighbor_spans", 0) for l in layers),
            "neighbor_unread_bytes": sum(l.get("neighbor_unread_bytes", 0) for l in layers),
            "neighbor_bytes": sum(l.get("neighbor_bytes", 0) for l in layers),
            "fetched_spans": sum(l.get("fetched_spans", 0) for l in layers),
            "header_only_spans": sum(l.get("header_only_spans", 0) for l in layers),
            "read_wait_s": sum(l["read_wait_seconds"] for l in layers)       # a service that counts it
            if all("read_wait_seconds" in l for l in layers) else None,
            "mounted_at": max((l["mounted_at"] for l in layers if "mounted_at" in l), default=None),
            "first_read_at": min(reads) if reads else None}


THREAD_GROUPS = ("main", "trio workers", "readahead", "prefetch", "cache-writer", "layer-check")


def service_threads_cpu(pid: int | None) -> dict[str, list[float]] | None:
    """User and system CPU seconds of the service's threads alive now, by the name the system
    shows (lazyoci names its own: libc.name_this_thread), numbered ones together (readahead-0..3
    as `readahead`), trio's worker threads (pulls, mounts, checks) as `trio workers`, the
    process's first thread (the FUSE loop) as `main`. A thread that ended is not counted."""
    if pid is None:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, list[float]] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        if task.name == str(pid):
            name = "main"
        elif name.startswith("Trio thread") or " from " in name:
            name = "trio workers"
        else:
            name = name.rstrip("0123456789").rstrip("-") or name
        cpu = out.setdefault(name, [0.0, 0.0])
        cpu[0] += int(fields[11]) / hz
        cpu[1] += int(fields[12]) / hz
    return {k: [round(u, 2), round(s_, 2)] for k, (u, s_) in out.items()}


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used so far (steadier than wall time on a shared machine)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cli_startup_s(root: Path, cfg: Path) -> float:
    """Wall seconds of `lazyoci --version`: the CLI start-up inside every command of a run."""
    t0 = time.monotonic()
    subprocess.run([LAZYOCI, "--root", str(root), "--config", str(cfg), "--version"],
                   stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - t0


def mount_fresh_filesystem(run_dir: Path) -> tuple[Path, str]:
    """A new ext4 filesystem (a sparse image on a loop device) mounted at `run_dir`; returns the
    image. ext4 skips inodes deleted in the last minutes when it allocates new ones, and each run
    deletes tens of thousands: on the shared data disk, a full pull (which creates every file of
    the image) slows down after the first run of a session, and lazy runs, which create few
    files, much less (bench/README.md). Returns the image and its loop device."""
    image = run_dir.with_name(run_dir.name + ".ext4")
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(FRESH_FS_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
                   check=True, capture_output=True)
    run_dir.mkdir(parents=True)
    # direct I/O: the loop device writes to the disk, not into the page cache a second time, so a
    # flush (syncfs) in the run reaches the disk as it would on a disk of its own
    device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(image)],
                            check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", device, str(run_dir)], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        subprocess.run(["losetup", "--detach", device], check=False)
        raise
    return image, device


def unmount_fresh_filesystem(run_dir: Path, fresh: tuple[Path, str]) -> None:
    """Unmount the run's filesystem, detach its loop device and delete its image."""
    image, device = fresh
    if subprocess.run(["umount", str(run_dir)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(run_dir)], check=False)
    subprocess.run(["losetup", "--detach", device], check=False)
    image.unlink(missing_ok=True)
    run_dir.rmdir()


def clear_leftover_run(run_dir: Path) -> None:
    """What a bench killed outright (SIGKILL) left of its last run: its service stopped, its mounts
    and its filesystem's loop device gone, so that this run does not fail on a busy directory."""
    root, cfg = run_dir / "root", run_dir / "config.yaml"
    if (root / "service/lazyoci.pid").exists():
        subprocess.run([LAZYOCI, "--root", str(root), *(["--config", str(cfg)] if cfg.exists() else []),
                        "service", "stop"], check=False, capture_output=True, timeout=120)
    for m in sorted(leftover_mounts(run_dir), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=False)
    image = run_dir.with_name(run_dir.name + ".ext4")
    if image.exists():
        attached = subprocess.run(["losetup", "--associated", str(image)], capture_output=True, text=True)
        for line in attached.stdout.splitlines():
            subprocess.run(["losetup", "--detach", line.split(":")[0]], check=False)


def one_run(ref: str, mode: str, proxy: localreg.Proxy, run_dir: Path, indexes: dict | None = None,
            service_log: Path | None = None, fresh_fs: bool = False) -> dict:
    """One measured pull + run on a fresh data root; always cleans up. The estargz and
    zstd-chunked modes run the image's converted copy (`layer_formats.repo_of`). With
    `service_log`, the service runs at DEBUG (one line per Range request) and its log is kept there.
    With `fresh_fs`, the run's directory is a new filesystem of its own (`mount_fresh_filesystem`)."""
    clear_leftover_run(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    fresh = mount_fresh_filesystem(run_dir) if fresh_fs else None
    root = run_dir / "root"
    root.mkdir(parents=True)
    # the run before may have left gigabytes to write back (an unpack, a span cache): not on this clock
    os.sync()
    cfg = run_dir / "config.yaml"
    cfg.write_text(config_text(mode))
    cli_log = run_dir / "cli.log"
    snap = SNAPSHOTTER.get(mode, "soci")
    ref = layer_formats.repo_of(ref, mode)
    rss = RssSampler(root)
    rss.start()
    result: dict = {"mode": mode}
    try:
        # the index by digest: with an optimized index beside the plain one, discovery would take
        # whichever the registry lists first
        index = (indexes or {}).get("optimized_index" if mode.startswith("soci-optimized") else "index")
        result["cli_s"] = cli_startup_s(root, cfg)
        if snap != "overlayfs":
            # the daemon runs before the clock, as containerd and the stargz daemon do in the
            # comparisons of bench/README.md; its cold start is its own column
            t = time.monotonic()
            if service_log is not None:     # the daemon itself, at DEBUG; `service start` then finds it
                subprocess.run([sys.executable, "-m", "lazyoci.service.daemon", "--root", str(root),
                                "--config", str(cfg), "--debug"], check=True, stdin=subprocess.DEVNULL)
            lazyoci(root, cfg, "service", "start", log_file=cli_log)
            result["service_start_s"] = time.monotonic() - t
        proxy.reset()
        wall0 = time.time()
        t0 = time.monotonic()
        lazyoci(root, cfg, "pull", "-q", "--snapshotter", snap, ref,
                *(["--soci-index-digest", index] if mode.startswith("soci") and index else []), log_file=cli_log)
        result["pull_s"] = time.monotonic() - t0
        s = proxy.stats()
        result["pull_bytes"], result["pull_requests"] = s["bytes"], s["requests"]
        if mode == "soci-bg":
            result["background_s"], result["unpacked_s"] = wait_background(root, cfg, timeout=3600)
        if mode == "soci-optimized-settled":
            result["background_s"] = wait_prefetched(root, cfg, timeout=600)
        before = proxy.stats()
        wall1 = time.time()
        t1 = time.monotonic()
        p = subprocess.Popen([LAZYOCI, "--root", str(root), "--config", str(cfg), "run", "--rm",
                              "--snapshotter", snap, ref],
                             stdout=subprocess.PIPE, stderr=open(cli_log, "ab"))
        ready = None
        output = []
        assert p.stdout is not None
        for line in p.stdout:
            output.append(line)
            if line.strip() == b"ready" and ready is None:
                ready = time.monotonic() - t1
        rc = p.wait(timeout=900)
        if rc != 0 or ready is None:
            raise RuntimeError(f"run exited {rc}, ready={'yes' if ready else 'no'}; output "
                               f"{b''.join(output)[-300:]!r}; log {cli_log.read_text(errors='replace')[-600:]}")
        result["ready_s"] = ready
        result["total_s"] = result["pull_s"] + ready
        after = proxy.stats()
        result["run_bytes"] = after["bytes"] - before["bytes"]
        result["run_requests"] = after["requests"] - before["requests"]
        result["bytes"], result["requests"] = after["bytes"], after["requests"]
        result["range_requests"] = after["range_requests"]
        if snap != "overlayfs":
            figures = service_figures(root)
            mounted, first = figures.pop("mounted_at", None), figures.pop("first_read_at", None)
            result.update(figures)
            if mounted and first and first >= wall1:    # the phases of a lazy start
                result["phase_mounted_s"] = mounted - wall0
                result["phase_pull_rest_s"] = result["pull_s"] - (mounted - wall0)
                result["phase_first_read_s"] = first - wall1
                result["phase_workload_s"] = ready - (first - wall1)
    finally:
        peak = rss.finish()
        result["service_peak_rss_mib"] = round(peak / 1024, 1) if peak else None
        pid = service_pid(root)
        result["service_cpu_s"] = process_cpu_s(pid)     # its start, the pull and the run
        result["service_threads_cpu"] = service_threads_cpu(pid)
        lazyoci(root, cfg, "service", "stop", check=False, timeout=120, log_file=cli_log)
        if service_log is not None and (root / "service/lazyoci.log").exists():
            service_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / "service/lazyoci.log", service_log)
        left = leftover_mounts(root)
        for m in sorted(left, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        if left:
            result["leftover_mounts"] = left
        if fresh is not None:
            unmount_fresh_filesystem(run_dir, fresh)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return result


def recorded_layers(optimize_log: str) -> dict[str, dict[str, int]]:
    """What `soci optimize` said it recorded, per layer (its digest's first 19 characters): the spans
    the workload read, and for a layer indexed again around the reads, its new span count and the
    read ranges it was laid out around. Each invocation records anew, so a recording that differs
    from the others (and the optimized runs that follow it) shows here."""
    out: dict[str, dict[str, int]] = {}
    for line in optimize_log.splitlines():
        m = re.match(r"layer (sha256:[0-9a-f]{12})[0-9a-f]*: zTOC \S+ with (\d+) spans laid out around (\d+) reads", line)
        if m:
            out.setdefault(m[1], {}).update(spans=int(m[2]), reads=int(m[3]))
        m = re.match(r"layer (sha256:[0-9a-f]{12})[0-9a-f]*: (\d+) spans read, prefetch artifact", line)
        if m:
            out.setdefault(m[1], {})["spans_read"] = int(m[2])
    return out


def prepare_image(name: str, reg: localreg.Registry, setup: Path, modes: list[str],
                  span_size: int | None = None) -> tuple[str, dict]:
    """Build (or reuse) the image, push it with skopeo, then give it a SOCI index with
    `lazyoci push --snapshotter soci`, and push the converted copies the modes run.
    Returns the repository path and the image facts."""
    optimize = any(m.startswith("soci-optimized") for m in modes)
    meta = ensure(name)
    repo = f"bench/{name}:latest"
    t0 = time.monotonic()
    localreg.skopeo_push_layout(image_dir(name), f"{reg.host}/{repo}")
    root = setup / name / "root"
    shutil.rmtree(setup / name, ignore_errors=True)
    root.mkdir(parents=True)
    cfg = setup / name / "config.yaml"
    cfg.write_text("snapshotters:\n  - overlayfs\n")
    log_file = setup / name / "setup.log"
    lazyoci(root, cfg, "pull", "-q", f"{reg.host}/{repo}", log_file=log_file)
    lazyoci(root, cfg, "push", "--snapshotter", "soci", f"{reg.host}/{repo}",
            *(["--soci-span-size", str(span_size)] if span_size else []), log_file=log_file)
    ztocs = sum(1 for line in log_file.read_text().splitlines() if "-> ztoc" in line)
    plain = [line.rsplit(" ", 1)[1] for line in log_file.read_text().splitlines()
             if "pushing soci index with digest: " in line]
    listed = subprocess.run([LAZYOCI, "--root", str(root), "--config", str(cfg), "soci", "ztoc", "list"],
                            capture_output=True, text=True, check=True).stdout.splitlines()[1:]
    ztoc_bytes = sum(int(line.split()[1]) for line in listed)
    optimized, recorded = None, {}
    if optimize:      # record the workload's reads into a second index (`lazyoci soci optimize`)
        opt = subprocess.run([LAZYOCI, "--root", str(root), "--config", str(cfg), "soci", "optimize",
                              f"{reg.host}/{repo}"], capture_output=True, text=True, timeout=3600)
        with open(log_file, "a") as f:
            f.write(opt.stdout + opt.stderr)
        found = [l.split()[2] for l in opt.stdout.splitlines() if l.startswith("soci index: ")]
        if opt.returncode != 0 or not found:
            raise RuntimeError(f"soci optimize exited {opt.returncode}: {opt.stderr[-600:]}")
        optimized = found[0]
        recorded = recorded_layers(opt.stderr)
    manifest = manifest_of(name)
    facts = {**meta, "layers": len(manifest["layers"]),
             "compressed_bytes": sum(l["size"] for l in manifest["layers"]),
             "ztocs": ztocs, "setup_s": round(time.monotonic() - t0, 1), "optimized_index": optimized,
             "optimized_layers": recorded,
             "index": plain[-1] if plain else None,
             "ztoc_bytes": ztoc_bytes, "span_size": span_size or 4 << 20}
    log(f"{name}: pushed with a SOCI index ({ztocs} zTOCs) in {facts['setup_s']}s")
    for fmt_mode in (m for m in modes if m in layer_formats.CONVERTERS):
        t1 = time.monotonic()
        facts[f"{fmt_mode}_bytes"] = layer_formats.CONVERTERS[fmt_mode](reg.host, repo, image_dir(name))
        log(f"{name}: converted to {fmt_mode} in {time.monotonic() - t1:.1f}s")
    shutil.rmtree(setup / name, ignore_errors=True)
    return repo, facts


def machine() -> dict:
    mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.machine())
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {"commit": commit or "unknown", "nproc": os.cpu_count(), "memory_gib": round(int(mem.split()[1]) / 2**20, 1),
            "kernel": platform.release(), "cpu": cpu,
            "loadavg_at_start": round(os.getloadavg()[0], 2)}


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["image"], r["profile"], r["mode"]), []).append(r)
    rows = []
    for (image, profile, mode), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        row = {"image": image, "profile": profile, "mode": mode, "runs": len(ok), "failed": len(rs) - len(ok)}
        for k in ("pull_s", "ready_s", "total_s", "background_s", "unpacked_s", "bytes", "requests",
                  "run_bytes", "service_peak_rss_mib", "service_cpu_s", "read_wait_s", "unread_bytes", "cli_s", "service_start_s", "phase_mounted_s",
                  "phase_pull_rest_s", "phase_first_read_s", "phase_workload_s", "service_requests",
                  "service_wait_s", "service_lookups", "service_lookup_wait_s"):
            row[k] = median([r.get(k) for r in ok])
        threads = [r["service_threads_cpu"] for r in ok if r.get("service_threads_cpu")]
        if threads:
            row["service_threads_cpu"] = {
                name: [median([t.get(name, [0.0, 0.0])[k] for t in threads]) for k in (0, 1)]
                for name in sorted({n for t in threads for n in t})}
        if len(ok) < len(rs):
            row["error"] = next(r["error"] for r in rs if "error" in r)
        rows.append(row)
    return rows


def fmt(v, spec: str = ".2f", unit: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{unit}"


_RUNS_SEEN: list[dict] = []


def _load_range() -> str:
    loads = [r["loadavg"] for r in _RUNS_SEEN if "loadavg" in r]
    return f"{min(loads):.1f}–{max(loads):.1f} (median {statistics.median(loads):.1f})" if loads else "n/a"


def write_report(command: str, mach: dict, facts: dict, rows: list[dict], started: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = ["# lazyoci benchmark results", "",
           f"Command: `{command}` at commit {mach['commit']}  ",
           f"Machine: {mach['nproc']} CPUs ({mach['cpu']}), {mach['memory_gib']} GiB memory, "
           f"Linux {mach['kernel']}; load average at start {mach['loadavg_at_start']}  ",
           f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; the whole run took "
           f"{(time.monotonic() - started) / 60:.1f} min", "",
           "Registry: docker-registry on loopback behind bench/throttle_proxy.py (one shared token "
           "bucket; latency added to every request). Every run starts from an empty data root. "
           "Times are medians; *pull+ready* is `lazyoci pull` plus `lazyoci run` up to the `ready` "
           "line. *soci-bg* waits for the background fetcher to finish, and the service to unpack "
           "the complete layers from its span cache, before `run` (that wait is not in pull+ready; "
           "*bg fetch s* and *bg unpacked s* count from the end of the pull). MB = 10^6 bytes. Load average (1 min) at the start of the runs: "
           f"{_load_range()} — the machine may be shared, which mostly slows the CPU-bound "
           "unpacking of full pulls.", "",
           "## Images", "",
           "| image | layers | compressed | zTOCs (span size, bytes) | workload needs | build time |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, f in facts.items():
        converted = ", ".join(f"{m} {f[m + '_bytes'] / 1e6:.0f} MB" for m in layer_formats.CONVERTERS
                              if m + "_bytes" in f)
        out.append(f"| {name} | {f['layers']} | {f['compressed_bytes'] / 1e6:.0f} MB"
                   f"{' (' + converted + ')' if converted else ''} | {f['ztocs']} "
                   f"({f.get('span_size', 4 << 20) >> 20} MiB, {f.get('ztoc_bytes', 0) / 1e6:.2f} MB) | "
                   f"{f['needed_bytes'] / 1e6:.2f} MB in {f['needed_files']} files | "
                   f"{f.get('build_seconds', 0) / 60:.1f} min |")
    out += ["", "## Measurements", "",
            "| image | profile | mode | runs | pull s | run→ready s | pull+ready s | bg fetch s | "
            "bg unpacked s | registry MB | fetched, never read MB | requests | reads waited s | service peak RSS MiB | "
            "service CPU s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in rows if r["mode"] in MODES),
                    key=lambda r: (r["image"], r["profile"], MODES.index(r["mode"]))):
        out.append(f"| {r['image']} | {r['profile']} | {r['mode']} | {r['runs']}"
                   f"{' (' + str(r['failed']) + ' failed)' if r['failed'] else ''} | "
                   f"{fmt(r['pull_s'])} | {fmt(r['ready_s'])} | {fmt(r['total_s'])} | "
                   f"{fmt(r['background_s'])} | {fmt(r.get('unpacked_s'))} | "
                   f"{fmt(r['bytes'] and r['bytes'] / 1e6, '.1f')} | "
                   f"{fmt(r['unread_bytes'] and r['unread_bytes'] / 1e6, '.1f')} | "
                   f"{fmt(r['requests'], '.0f')} | {fmt(r.get('read_wait_s'))} | "
                   f"{fmt(r['service_peak_rss_mib'], '.0f')} | "
                   f"{fmt(r.get('service_cpu_s'), '.1f')} |")
    phased = [r for r in rows if r.get("phase_mounted_s") is not None]
    if phased:
        out += ["", "## Phases of a lazy start (medians)", "",
                "| image | profile | mode | service start (before the clock) s | CLI start-up s | "
                "pull: until its layers are mounted s | "
                "pull: the rest s | run: until the first lazy read s | first read → ready s | "
                "FUSE requests the service answered | their wait s | LOOKUPs among them | their wait s |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(phased, key=lambda r: (r["image"], r["profile"], MODES.index(r["mode"]))):
            out.append(f"| {r['image']} | {r['profile']} | {r['mode']} | {fmt(r.get('service_start_s'))} | "
                       f"{fmt(r['cli_s'])} | "
                       f"{fmt(r['phase_mounted_s'])} | {fmt(r['phase_pull_rest_s'])} | "
                       f"{fmt(r['phase_first_read_s'])} | {fmt(r['phase_workload_s'])} | "
                       f"{fmt(r.get('service_requests'), '.0f')} | {fmt(r.get('service_wait_s'))} | "
                       f"{fmt(r.get('service_lookups'), '.0f')} | {fmt(r.get('service_lookup_wait_s'))} |")
        out += ["", "CLI start-up is `lazyoci --version` alone (each `pull` and `run` pays it once); "
                "the pull mounts lazy layers while it downloads the others, so *the rest* is what "
                "it does after the last mount (small layers, records); *until the first lazy read* "
                "holds `run`'s own start-up, the overlay and runc. The FUSE requests the session "
                "holder relayed to the service, and the seconds they waited for its replies in all, "
                "are the holder's count (the others it answers itself); in python-ml's optimized starts "
                "most of the LOOKUPs among them were the first name looked up in a directory (bench/README.md)."]
    threaded = [r for r in rows if r.get("service_threads_cpu")]
    if threaded:
        out += ["", "## The service's CPU by thread (medians, user + system s)", "",
                "| image | profile | mode | " + " | ".join(THREAD_GROUPS) + " | others | ended s |",
                "|---|---|---|" + "---:|" * (len(THREAD_GROUPS) + 2)]
        for r in sorted(threaded, key=lambda r: (r["image"], r["profile"], MODES.index(r["mode"]))):
            cpu = r["service_threads_cpu"]
            rest = [sum(v[k] for n, v in cpu.items() if n not in THREAD_GROUPS) for k in (0, 1)]
            cells = [cpu.get(n) for n in THREAD_GROUPS] + [rest]
            alive = sum(u + s_ for u, s_ in cpu.values())
            ended = r["service_cpu_s"] - alive if r.get("service_cpu_s") is not None else None
            out.append(f"| {r['image']} | {r['profile']} | {r['mode']} | " + " | ".join(
                "—" if c is None else f"{c[0]:.2f} + {c[1]:.2f}" for c in cells) + f" | {fmt(ended)} |")
        out += ["", "From /proc when the run ended, the service's start included. *main* is the FUSE "
                "loop (the requests the session holder relays), *trio workers* the pulls, mounts "
                "and checks run off it while they live, *readahead* the threads that fetch, verify "
                "and inflate spans for reads and read-ahead, *prefetch* those of a recorded "
                "prefetch, *cache-writer* the one that writes spans to the span cache; *ended* is "
                "the CPU of threads gone by then (the process's total less the threads alive: "
                "mostly trio's idle workers, which end after a while)."]
    out += ["", "## Lazy vs full", "",
            "| image | profile | full pull+ready s | lazy pull+ready s | lazy/full | floor s | "
            "lazy MB / full MB |", "|---|---|---:|---:|---:|---:|---:|"]
    by = {(r["image"], r["profile"], r["mode"]): r for r in rows}
    for (image, profile, mode), r in sorted(by.items()):
        if mode != "overlayfs":
            continue
        lazy = by.get((image, profile, "soci"))
        if not lazy:
            continue
        rate = PROFILES[profile][0] * 1e6
        floor = facts[image]["needed_bytes"] / rate
        ratio = (lazy["total_s"] / r["total_s"]) if lazy["total_s"] and r["total_s"] else None
        bratio = (lazy["bytes"] / r["bytes"]) if lazy["bytes"] and r["bytes"] else None
        out.append(f"| {image} | {profile} | {fmt(r['total_s'])} | {fmt(lazy['total_s'])} | "
                   f"{fmt(ratio, '.3f')} | {floor:.3f} | {fmt(bratio, '.3f')} |")
    errors = [r for r in rows if r.get("error")]
    if errors:
        out += ["", "## Failures", ""]
        out += [f"- {r['image']} {r['profile']} {r['mode']}: {r['error'][:400]}" for r in errors]
    out += ["", "The floor is the bytes the workload reads (uncompressed, see bench/images/*.py) "
            "divided by the bandwidth: no loader can be faster over that link.", ""]
    (RESULTS / "RESULTS.md").write_text("\n".join(out))


def write_chart(rows: list[dict], facts: dict, profiles: list[str]) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (pip install -e '.[bench]'): no chart")
        return None
    by = {(r["image"], r["profile"], r["mode"]): r for r in rows}
    images = list(facts)
    fig, axes = plt.subplots(1, len(profiles), figsize=(6 * len(profiles), 4.5), squeeze=False)
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    width = 0.75 / max(len(modes), 1)
    for ax, profile in zip(axes[0], profiles):
        for j, mode in enumerate(modes):
            vals = [(by.get((im, profile, mode)) or {}).get("total_s") or 0 for im in images]
            bars = ax.bar([i + (j - (len(modes) - 1) / 2) * width for i in range(len(images))], vals, width,
                          label=MODE_LABEL[mode])
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        for i, im in enumerate(images):
            floor = facts[im]["needed_bytes"] / (PROFILES[profile][0] * 1e6)
            ax.hlines(floor, i - 0.4, i + 0.4, colors="black", linestyles="dashed",
                      label="floor" if i == 0 else None)
        ax.set_xticks(range(len(images)), images)
        ax.set_ylabel("pull + run to ready (s)")
        ax.set_title(profile)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / "chart.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _stopped(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def main() -> None:
    global RESULTS
    # TERM, or INT (which a shell ignores in a job it starts in the background), ends the bench
    # through the `finally`s that stop the run's service, its mounts and loop device, the proxies
    # and the registry: killed outright, it left them all behind
    signal.signal(signal.SIGTERM, _stopped)
    signal.signal(signal.SIGINT, _stopped)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=",".join(BUILDERS))
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help=f"of {', '.join(MODES)} (default: all but overlayfs-sync)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    ap.add_argument("--span-size", type=int, default=None, help="span size of the SOCI indexes (default 4 MiB)")
    ap.add_argument("--service-logs", type=Path, default=None,
                    help="run the service at DEBUG and keep its log of every lazy run in this directory")
    ap.add_argument("--fresh-fs", action="store_true",
                    help="each run on a new ext4 filesystem of its own (a loop device), so that no run "
                         "pays for the inodes the runs before it deleted")
    ap.add_argument("--nagle-proxy", action="store_true",
                    help="the throttling proxy without TCP_NODELAY, as before 2026-12-02 (about 40 ms more "
                         "per request on a kept-alive connection): to compare with figures measured then")
    args = ap.parse_args()
    RESULTS = args.out.resolve()
    images = [i for i in args.images.split(",") if i]
    profiles = [p for p in args.profiles.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    for what, got, known in (("image", images, BUILDERS), ("profile", profiles, PROFILES), ("mode", modes, MODES)):
        bad = [g for g in got if g not in known]
        if bad:
            ap.error(f"unknown {what} {bad[0]!r} (choose from {', '.join(known)})")
    if os.geteuid() != 0:
        sys.exit("run_bench.py needs root (overlayfs, FUSE, runc, mmdebstrap)")
    compile_lazyoci()
    command = "python bench/run_bench.py " + " ".join(sys.argv[1:])
    started = time.monotonic()
    WORK.mkdir(exist_ok=True)
    mach = machine()
    # a registry of this run alone: an index pushed by an earlier run (another span size, an
    # optimized one) would be among the referrers, and discovery takes the first
    shutil.rmtree(WORK / "registry", ignore_errors=True)
    reg = localreg.start_registry(WORK / "registry")
    proxies: list[localreg.Proxy] = []
    runs: list[dict] = []
    facts: dict = {}
    try:
        for name in list(images):
            log(f"{name}: building (cached after the first time) and pushing")
            try:
                _, facts[name] = prepare_image(name, reg, WORK / "setup", modes, args.span_size)
            except Exception as e:  # noqa: BLE001 - the other images can still be measured
                log(f"{name}: setup FAILED, skipped: {type(e).__name__}: {e}")
                runs.append({"image": name, "profile": "-", "mode": "setup",
                             "error": f"setup: {type(e).__name__}: {e}"})
                images.remove(name)
        for profile in profiles:
            rate, latency = PROFILES[profile]
            proxy = localreg.start_proxy(reg.host, rate, latency, WORK, nagle=args.nagle_proxy)
            proxies.append(proxy)
            for name in images:
                ref = f"{proxy.host}/bench/{name}:latest"
                for i in range(args.runs):
                    for mode in modes:       # interleaved, so drift hits every mode alike
                        rec = {"image": name, "profile": profile, "mode": mode, "run": i + 1,
                               "loadavg": round(os.getloadavg()[0], 2)}
                        try:
                            slog = args.service_logs and \
                                args.service_logs.resolve() / f"{name}-{profile}-{mode}-{i + 1}.log"
                            rec.update(one_run(ref, mode, proxy, WORK / "run", facts[name], slog or None,
                                               fresh_fs=args.fresh_fs))
                            log(f"{name} {profile} {mode} #{i + 1}: pull {rec['pull_s']:.2f}s, "
                                f"ready {rec['ready_s']:.2f}s, {rec['bytes'] / 1e6:.1f} MB in "
                                f"{rec['requests']} requests, reads waited {rec.get('read_wait_s')} s, "
                                f"service RSS {rec['service_peak_rss_mib']} MiB, CPU {rec.get('service_cpu_s')} s")
                        except Exception as e:  # noqa: BLE001 - record and go on: a table with a hole beats none
                            rec["error"] = f"{type(e).__name__}: {e}"
                            log(f"{name} {profile} {mode} #{i + 1}: FAILED {rec['error'][:300]}")
                        runs.append(rec)
                        _RUNS_SEEN.append(rec)
                        RESULTS.mkdir(parents=True, exist_ok=True)
                        (RESULTS / "results.json").write_text(json.dumps(
                            {"command": command, "machine": mach, "images": facts, "runs": runs}, indent=1))
                        write_report(command, mach, facts, summarize(runs), started)
            proxy.stop()
    finally:
        for p in proxies:
            p.stop()
        reg.stop()
    rows = summarize(runs)
    write_report(command, mach, facts, rows, started)
    chart = write_chart(rows, facts, profiles)
    log(f"wrote {RESULTS / 'RESULTS.md'}" + (f" and {chart}" if chart else ""))
    print((RESULTS / "RESULTS.md").read_text())


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        sys.exit(f"run_bench.py: {str(e) or 'interrupted'}; what it measured so far is in {RESULTS}")
