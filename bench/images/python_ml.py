"""python-ml: Debian bookworm + python3 + numpy/scipy/pandas (Debian) + the CPU torch wheel.

Layers as a Dockerfile would make them:
    FROM debian:bookworm (mmdebstrap --variant=minbase)        -> base
    RUN apt-get install python3                                 -> runtime
    RUN apt-get install python3-numpy python3-scipy python3-pandas -> libraries
    RUN pip install torch==2.13.0                               -> torch
    COPY app/ /app/                                             -> app
Ready when `python3 -c "import torch; print('ready')"` prints `ready`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ocibuild import Layout, snapshot, tar_changes

CMD = ["python3", "-c", "import torch; print('ready')"]
TORCH = "torch==2.13.0"    # the CPU wheel that pip takes from this machine's local disk


def _in_chroot(root: Path, script: str) -> None:
    """Run a shell script chrooted into `root`, with /proc and /dev in a private mount
    namespace (so nothing stays mounted if the build dies)."""
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    try:
        subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && '
             'exec chroot "$0" env DEBIAN_FRONTEND=noninteractive sh -ec "$1"',
             str(root), script],
            check=True)
    finally:
        (root / "etc/resolv.conf").unlink(missing_ok=True)


def _apt(root: Path, packages: str) -> None:
    _in_chroot(root, "apt-get update -qq; "
                     f"apt-get install -y -qq --no-install-recommends {packages} >/dev/null; "
                     "apt-get clean; rm -rf /var/lib/apt/lists/*")


def _opened_files(root: Path) -> list[Path]:
    """The regular files the workload opens or executes (strace in the chroot)."""
    log = root.parent / "strace.log"
    subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && '
         'exec strace -f -qq -e trace=open,openat,execve -o "$1" chroot "$0" "$2" "$3" "$4"',
         str(root), str(log), *CMD],
        check=True, stdout=subprocess.DEVNULL)
    seen: set[str] = set()
    pat = re.compile(r'(?:openat\([^,]+, |open\(|execve\()"([^"]+)".*\) = (\d+)')
    for line in log.read_text().splitlines():
        m = pat.search(line)
        if m:
            seen.add(m.group(1))
    log.unlink()
    files = []
    for p in sorted(seen):
        host = root / p.lstrip("/")
        if not p.startswith(("/proc", "/dev", "/sys")) and host.is_file():
            files.append(host.resolve())
    return sorted(set(files))


def needed_bytes(root: Path) -> dict:
    """What the workload really reads: run it once under strace to list the files it opens,
    drop those files from the page cache, run it again and count their resident pages
    (fincore). That counts mmap'd pages too (libtorch is mostly mmap'd, and only partly
    touched), plus the kernel's readahead, which a FUSE-backed loader sees as well."""
    files = _opened_files(root)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && '
         'exec chroot "$0" "$1" "$2" "$3"', str(root), *CMD],
        capture_output=True, text=True)
    if out.returncode != 0 or out.stdout.strip() != "ready":
        raise SystemExit(f"python-ml workload printed {out.stdout!r}, not 'ready': {out.stderr[-1500:]}")
    res = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          *map(str, files)], check=True, capture_output=True, text=True).stdout
    return {"needed_bytes": sum(int(x) for x in res.split()), "needed_files": len(files),
            "opened_bytes": sum(f.stat().st_size for f in files),
            "needed_how": "page-cache pages of the opened files after one run from a cold cache "
                          "(strace for the list, fincore for the pages); opened_bytes = their whole sizes"}


def remeasure(layout: Path, work: Path) -> dict:
    """needed_bytes() for an image already built: unpack it with umoci first."""
    bundle = work / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        return needed_bytes(bundle / "rootfs")
    finally:
        shutil.rmtree(bundle, ignore_errors=True)


def build(out: Path, work: Path) -> dict:
    """Build the layout at `out`; `work` is scratch (the rootfs)."""
    root = work / "rootfs"
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    layout = Layout(out)

    print("python-ml: mmdebstrap bookworm (minbase)", flush=True)
    subprocess.run(["mmdebstrap", "--mode=root", "--variant=minbase", "-q", "bookworm", str(root)],
                   check=True)
    snap = snapshot(root)
    layout.add_layer(tar_changes(root, {}, snap), "FROM debian:bookworm (mmdebstrap minbase)")

    print("python-ml: runtime (python3)", flush=True)
    _apt(root, "python3")
    prev, snap = snap, snapshot(root)
    layout.add_layer(tar_changes(root, prev, snap), "RUN apt-get install python3")

    print("python-ml: libraries (numpy scipy pandas)", flush=True)
    _apt(root, "python3-numpy python3-scipy python3-pandas")
    prev, snap = snap, snapshot(root)
    layout.add_layer(tar_changes(root, prev, snap),
                     "RUN apt-get install python3-numpy python3-scipy python3-pandas")

    print(f"python-ml: pip install {TORCH}", flush=True)
    target = root / "usr/local/lib/python3.11/dist-packages"
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-warn-script-location",
                    "--target", str(target), TORCH], check=True)
    prev, snap = snap, snapshot(root)
    layout.add_layer(tar_changes(root, prev, snap), f"RUN pip install {TORCH}")

    print("python-ml: app", flush=True)
    (root / "app").mkdir(exist_ok=True)
    (root / "app/app.py").write_text("import torch\nprint('ready', flush=True)\n")
    prev, snap = snap, snapshot(root)
    layout.add_layer(tar_changes(root, prev, snap), "COPY app/ /app/")
    digest = layout.finish(CMD, workdir="/app")

    print("python-ml: measuring what the workload reads (strace + fincore)", flush=True)
    return {"manifest_digest": digest, **needed_bytes(root)}
