"""python3: a realistic small start from a big image. An interpreter layer made of this
machine's own python3 (the binary, the shared libraries it links, the standard library and
dist-packages, about 100 MiB of tar) over busybox, and a 200 MiB data layer the workload never
touches; the workload starts the interpreter and prints one line. Built without network access.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ocibuild import Layout, busybox_tree, fresh_dir, tar_tree

PYTHON = "/usr/bin/python3.11"
CMD = [PYTHON, "-c", "print('ready')"]
TREES = ("/usr/lib/python3.11", "/usr/lib/python3/dist-packages")
MiB = 1 << 20


def _libraries(binary: str) -> list[str]:
    """The shared libraries `binary` links (ldd), the dynamic loader among them."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(path)
    return libs


def _copy(src: str, root: Path) -> None:
    dest = root / src.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(src):
        shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    else:
        shutil.copy2(os.path.realpath(src), dest)


def _needed() -> tuple[int, int]:
    """The files the host's interpreter opens to print a line (module files, binary, libraries):
    an estimate of what the workload reads."""
    code = ("import sys; print('\\n'.join(getattr(m, '__file__', None) or '' for m in list(sys.modules.values())))")
    files = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    files += [PYTHON] + _libraries(PYTHON)
    found = {os.path.realpath(f) for f in files if f and os.path.exists(f)}
    return sum(os.path.getsize(f) for f in found), len(found)


def build(out: Path, work: Path) -> dict:
    if not os.path.exists(PYTHON):
        raise SystemExit(f"{PYTHON} is not installed")
    tree = fresh_dir(work / "python")
    busybox_tree(tree)
    for src in (PYTHON, *_libraries(PYTHON), *TREES):
        if os.path.exists(src):
            _copy(src, tree)
    data = fresh_dir(work / "data")
    rng = open("/dev/urandom", "rb")
    for i, size in enumerate((64 * MiB, 64 * MiB, 40 * MiB, 32 * MiB)):
        path = data / "srv/data" / f"part-{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for _ in range(size // (4 * MiB)):
                f.write(rng.read(4 * MiB))
    layout = Layout(out)
    layout.add_layer(tar_tree(tree), "COPY python3 /")
    layout.add_layer(tar_tree(data), "COPY data/ /srv/data/")
    digest = layout.finish(CMD)
    needed, files = _needed()
    return {"manifest_digest": digest, "needed_bytes": needed, "needed_files": files,
            "needed_how": "the files of the modules the host's interpreter has loaded after print, "
                          "its binary and libraries (an estimate)", "python": sys.version.split()[0]}
