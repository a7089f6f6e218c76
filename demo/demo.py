#!/usr/bin/env python3
"""`make demo`: the Finch lazy-loading walkthrough, told with lazyoci against a local registry.

1. A config file with `snapshotters: [soci]`, then `lazyoci service stop` / `start`.
2. The sample image built from demo/Dockerfile with `lazyoci build` (buildah): a busybox base,
   about 100 MiB of data in one layer, a message. The base is a static busybox made with
   `lazyoci import` and pushed to the local registry, so the demo needs no Docker Hub.
3. `lazyoci push --snapshotter soci` (image + SOCI index); the same image pushed to a second
   repository without an index; both removed locally with `lazyoci rmi`.
4. `lazyoci run` (soci, the config's default): the container starts before the layer is downloaded.
5. `lazyoci run` of the copy without an index: every layer is downloaded first (the fallback).
6. The two times side by side.

The registry is Debian's docker-registry on a free loopback port. So that the network
matters as it would with a remote registry, the runs pull through bench/throttle_proxy.py
(20 MB/s, +50 ms per request). Everything lives under ./demo-root and is stopped at the end.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import localreg  # noqa: E402

DEMO = REPO / "demo-root"
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
RATE_MBS, LATENCY_MS = 20.0, 50.0
DATA_MIB = 96                     # what demo/Dockerfile writes
MESSAGE = (REPO / "demo" / "message.txt").read_text().strip()
APPLETS = ("sh", "cat", "echo", "ls", "mkdir", "head", "yes")


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def lazyoci(*args: str, capture: bool = False) -> tuple[float, str]:
    """Run a lazyoci command as a user would type it (root and config come from the env);
    its output goes to the terminal. Returns (seconds, stdout if captured)."""
    print(f"$ lazyoci {shlex.join(args)}", flush=True)
    t0 = time.monotonic()
    p = subprocess.run([LAZYOCI, *args], text=True,
                       stdout=subprocess.PIPE if capture else None)
    seconds = time.monotonic() - t0
    if capture and p.stdout:
        print(p.stdout, end="", flush=True)
    if p.returncode != 0:
        raise SystemExit(f"demo: `lazyoci {shlex.join(args)}` failed with exit code {p.returncode}")
    return seconds, p.stdout or ""


def make_base_rootfs(dest: Path) -> None:
    """A static busybox with the applets demo/Dockerfile uses: the base image of the build."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "bin").mkdir(parents=True)
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise SystemExit("demo: /bin/busybox is missing: run `make deps` (Debian busybox-static)")
    shutil.copy2(busybox, dest / "bin/busybox")
    for applet in APPLETS:
        (dest / "bin" / applet).symlink_to("busybox")
    for d in ("etc", "tmp", "proc", "sys", "dev", "root"):
        (dest / d).mkdir()
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (overlayfs, FUSE and runc need it)")
    if DEMO.exists():
        subprocess.run([LAZYOCI, "--root", str(DEMO / "root"), "service", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(DEMO)
    DEMO.mkdir()
    config = DEMO / "config.yaml"
    os.environ["LAZYOCI_ROOT"] = str(DEMO / "root")
    os.environ["LAZYOCI_CONFIG"] = str(config)
    reg = proxy = None
    try:
        reg = localreg.start_registry(DEMO / "registry")
        proxy = localreg.start_proxy(reg.host, RATE_MBS, LATENCY_MS, DEMO)
        print(f"lazyoci demo: data root {DEMO / 'root'}, config {config}\n"
              f"registry: docker-registry at {reg.host}; pulls go through a proxy at {proxy.host} "
              f"that limits them to {RATE_MBS:.0f} MB/s with {LATENCY_MS:.0f} ms per request, "
              "like a registry across a network.")
        lazy_ref, full_ref = f"{reg.host}/demo/app:latest", f"{reg.host}/demo/app-noindex:latest"
        lazy_run = f"{proxy.host}/demo/app:latest"
        full_run = f"{proxy.host}/demo/app-noindex:latest"

        banner("1. Enable the SOCI snapshotter (config file), then restart the service")
        config.write_text("snapshotters:\n  - soci\n")
        print(f"{config}:\n" + config.read_text())
        lazyoci("service", "stop")
        lazyoci("service", "start")

        banner(f"2. Build the sample image from demo/Dockerfile: busybox + {DATA_MIB} MiB of data")
        base_ref = f"{reg.host}/demo/busybox:latest"
        make_base_rootfs(DEMO / "rootfs")
        lazyoci("import", "--change", 'CMD ["sh"]', str(DEMO / "rootfs"), base_ref)
        lazyoci("push", base_ref)
        t0 = time.monotonic()
        lazyoci("build", "-t", lazy_ref, "--build-arg", f"BASE={base_ref}", str(REPO / "demo"))
        print(f"(built in {time.monotonic() - t0:.1f}s)")
        lazyoci("images")

        banner("3. Push with a SOCI index; push a copy without one; remove both locally")
        lazyoci("push", "--snapshotter", "soci", lazy_ref)
        lazyoci("tag", lazy_ref, full_ref)
        lazyoci("push", full_ref)
        lazyoci("rmi", lazy_ref, full_ref, base_ref)
        lazyoci("images")

        banner("4. Run with the SOCI snapshotter: the container starts before the layer is downloaded")
        proxy.reset()
        lazy_s, lazy_out = lazyoci("run", "--rm", "--snapshotter", "soci", lazy_run, capture=True)
        lazy_stats = proxy.stats()
        lazyoci("service", "status")

        banner("5. The same image without an index: lazyoci falls back to a full download")
        lazyoci("rmi", lazy_run)     # nothing of it stays local: the fallback starts from zero
        lazyoci("images")
        proxy.reset()
        full_s, full_out = lazyoci("run", "--rm", "--snapshotter", "soci", full_run, capture=True)
        full_stats = proxy.stats()

        banner("6. Side by side")
        for out in (lazy_out, full_out):
            if MESSAGE not in out:
                raise SystemExit(f"demo: the container printed {out!r}, not the message")
        width = 34
        print(f"{'':<{width}}{'with SOCI index':>18}{'without (fallback)':>22}")
        print(f"{'lazyoci run, start to exit':<{width}}{lazy_s:>17.2f}s{full_s:>21.2f}s")
        print(f"{'bytes from the registry':<{width}}{lazy_stats['bytes'] / 1e6:>16.1f} MB"
              f"{full_stats['bytes'] / 1e6:>19.1f} MB")
        print(f"{'registry requests':<{width}}{lazy_stats['requests']:>18}{full_stats['requests']:>22}")
        link = f"{RATE_MBS:.0f} MB/s, {LATENCY_MS:.0f} ms per request"
        if lazy_stats["bytes"] >= 0.9 * full_stats["bytes"]:
            print(f"\nThe run with an index downloaded as much as the fallback: it was NOT lazy ({link}).")
        elif lazy_s < full_s:
            print(f"\nLazy loading started the container {full_s / lazy_s:.1f}x sooner, reading "
                  f"{lazy_stats['bytes'] / max(full_stats['bytes'], 1):.0%} of the bytes ({link}).")
        else:
            print(f"\nLazy loading read {lazy_stats['bytes'] / max(full_stats['bytes'], 1):.0%} of the "
                  f"bytes but was not faster on this link ({link}).")
    finally:
        banner("Clean up")
        try:
            lazyoci("service", "stop")
        except SystemExit as e:
            print(e)
        if proxy:
            proxy.stop()
        if reg:
            reg.stop()
        print(f"registry and proxy stopped; {DEMO} is kept for inspection (`make demo` starts afresh).")


if __name__ == "__main__":
    main()
