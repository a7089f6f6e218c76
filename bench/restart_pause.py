"""What a reader of a lazy layer sees while the service restarts, and what the session holder costs.

    python bench/restart_pause.py --restarts 10 --kills 5          # as root
    python bench/restart_pause.py --throughput-only                 # also runs on code without the holder

Pushes one layer holding a file of --file-mib MiB (random bytes) to a local registry, serves it
through the lazyoci service (zTOC of 4 MiB spans) and reads it once so that every span is in
the disk cache. Then:

- throughput: the file read whole with 1 MiB reads after dropping its page cache
  (posix_fadvise DONTNEED), so that every byte is a FUSE READ answered from the span cache;
  median and best of --rounds rounds, in MiB/s (on a shared machine the best is the steadier);
- pause: a reader drops and reads 128 KiB at random offsets in a loop while the script runs
  `service restart` (`ServiceClient.restart`) --restarts times and kill -9 + `service start`
  --kills times, a second apart; a restart's pause is the longest single read that overlapped
  it. p50 and max of each kind, and the new service's own time to serving the handed-over
  session (`serving_after_seconds` of `service status`: from the old one's exit for a restart,
  whose new process mounts the layers beforehand; from its own start after a kill);
- the holder's RSS, and the CPU time the holder and the service spend per GiB read (a cost
  that other load on the machine does not blur as it does throughput).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import localreg  # noqa: E402
from process_cpu import cpu_seconds  # noqa: E402
from helpers.images import Entry, image_config, make_layer, push_image  # noqa: E402
from helpers.lazy import store_ztoc, ztoc_for  # noqa: E402

from lazyoci.service.client import ServiceClient  # noqa: E402
from lazyoci.store.layout import DataRoot  # noqa: E402

CHUNK = 128 << 10


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _relayed(client: ServiceClient) -> int:
    """FUSE replies the session holder relayed so far (0 without one)."""
    try:
        from lazyoci.service.holder_link import holder_status
    except ImportError:
        return 0
    return int((holder_status(client.holder) or {}).get("relayed", 0))


def _read_whole(path: Path) -> float:
    """Seconds to read the file with its page cache dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        while os.read(fd, 1 << 20):
            pass
        return time.perf_counter() - start
    finally:
        os.close(fd)


class Reader(threading.Thread):
    """Reads 128 KiB at random offsets, page cache dropped each time; keeps (start, end) of each."""

    def __init__(self, path: Path, size: int) -> None:
        super().__init__(daemon=True)
        self.path, self.size = path, size
        self.reads: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(1)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            while not self.stop.is_set():
                off = rng.randrange(0, self.size - CHUNK) & ~4095
                os.posix_fadvise(fd, off, CHUNK, os.POSIX_FADV_DONTNEED)
                start = time.monotonic()
                try:
                    if len(os.pread(fd, CHUNK, off)) != CHUNK:
                        self.errors.append(f"short read at {off}")
                except OSError as e:
                    self.errors.append(str(e))
                self.reads.append((start, time.monotonic()))
        finally:
            os.close(fd)

    def longest_within(self, t0: float, t1: float) -> float:
        return max((e - s for s, e in self.reads if e >= t0 and s <= t1), default=0.0)


def _summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(1000 * statistics.median(values), 1), "max_ms": round(1000 * max(values), 1),
            "n": len(values)} if values else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=10)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--throughput-only", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="restart-pause-"))
    reg = localreg.start_registry(work / "registry")
    root = DataRoot(work / "root").ensure()
    cfg = work / "config.yaml"
    cfg.write_text("soci:\n  background_fetch: false\n")
    client = ServiceClient(root, cfg)
    out: dict[str, object] = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                              "file_mib": args.file_mib, "cpus": os.cpu_count(), "kernel": os.uname().release}
    try:
        layer = make_layer([Entry("data/", kind="dir"), Entry("data/file.bin", data=os.urandom(args.file_mib << 20))])
        push_image(reg.host, "bench/restart", [layer], image_config([layer]), work)
        zdigest = store_ztoc(root.path, ztoc_for(layer))
        client.start()
        path = client.mount_layer(f"{reg.host}/bench/restart:latest", layer.digest, zdigest) / "data/file.bin"
        _read_whole(path)                                            # every span into the disk cache
        holder = _pid(root.service / "holder.pid")      # none without the session holder
        service = _pid(client.paths.pid_file)
        cpu = {name: cpu_seconds(pid) for name, pid in (("holder", holder), ("service", service)) if pid}
        relayed = _relayed(client)
        times = [_read_whole(path) for _ in range(args.rounds)]
        gib = args.rounds * args.file_mib / 1024
        if holder:
            out["messages_per_gib"] = round((_relayed(client) - relayed) / gib)
        out["cpu_seconds_per_gib"] = {name: round((cpu_seconds(pid) - cpu[name]) / gib, 2)
                                      for name, pid in (("holder", holder), ("service", service)) if pid}
        out["throughput_mib_s"] = {"median": round(args.file_mib / statistics.median(times), 1),
                                   "best": round(args.file_mib / min(times), 1)}
        if not args.throughput_only:
            reader = Reader(path, args.file_mib << 20)
            reader.start()
            pauses: dict[str, list[float]] = {"restart": [], "kill_9": []}
            serving: dict[str, list[float]] = {"restart": [], "kill_9": []}
            for kind in ["restart"] * args.restarts + ["kill_9"] * args.kills:
                time.sleep(1.0)
                t0 = time.monotonic()
                if kind == "restart":
                    client.restart()
                else:
                    pid = int(client.paths.pid_file.read_text())
                    os.kill(pid, signal.SIGKILL)
                    client.start()        # waits for the dead one's pid-file lock, then launches
                st = client.status()
                serving[kind].append(st["session"]["serving_after_seconds"])
                time.sleep(0.5)                       # reads that waited have finished
                pauses[kind].append(reader.longest_within(t0, time.monotonic()))
            reader.stop.set()
            reader.join()
            steady = [e - s for s, e in reader.reads]
            out["reads"] = len(steady)
            out["read_p50_ms"] = round(1000 * statistics.median(steady), 2)
            out["read_errors"] = reader.errors[:5]
            out["pause_restart"] = _summary(pauses["restart"])
            out["pause_kill_9_then_start"] = _summary(pauses["kill_9"])
            out["serving_after_restart"] = _summary(serving["restart"])
            out["serving_after_kill_9_then_start"] = _summary(serving["kill_9"])
            from lazyoci.service.holder_link import holder_status
            held = holder_status(client.holder)
            out["holder_rss_kib"] = (held or {}).get("rss_bytes", 0) // 1024
            out["service_rss_kib"] = client.status()["rss_bytes"] // 1024
    finally:
        try:
            client.stop(force=True)
        finally:
            reg.stop()
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
