#!/usr/bin/env python3
"""Lazy reads against a stalling and a slow registry, with the default `soci.fetch_*` limits.

    .venv/bin/python bench/fetch_stalls.py      (as root: FUSE)

Prints three figures: how long a 12 KB read takes to fail (EIO) when the registry
sends one byte every 20 s; how long `lazyoci service stop` takes while such a read
waits; how long an 8 MiB file (two 4 MiB spans) takes over a 1 MB/s link, and
whether anything was cut. Uses the test suite's registry and fault proxy helpers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from helpers.fault_proxy import Fault, FaultProxy                      # noqa: E402
from helpers.images import Entry, image_config, make_layer, push_image  # noqa: E402
from helpers.lazy import running_service, store_ztoc, write_config, ztoc_for  # noqa: E402
from helpers.registry import start_registry                            # noqa: E402

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def _dd(path: Path, skip_blocks: int) -> subprocess.Popen:
    return subprocess.Popen(["dd", f"if={path}", "of=/dev/null", "bs=12k", f"skip={skip_blocks}", "count=1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0].rsplit(": ", 1)[-1]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="fetch-stalls-"))
    registry = start_registry(work / "registry")
    try:
        data = os.urandom(8 << 20)
        layer = make_layer([Entry("f.bin", data=data)], "gzip")
        push_image(registry.host, "bench/stalls", [layer], image_config([layer]), work)
        root = work / "root"
        root.mkdir()
        ztoc = store_ztoc(root, ztoc_for(layer))      # 4 MiB spans, as the reference builds them
        config = write_config(work / "config.yaml")    # the default fetch limits
        with FaultProxy(registry.host) as proxy:
            with running_service(root, config) as client:
                d = client.mount_layer(f"{proxy.host}/bench/stalls:latest", layer.digest, ztoc)
                proxy.add(Fault("drip", match=layer.digest, method="GET", rate=1e6, times=None))
                started = time.monotonic()
                same = (d / "f.bin").read_bytes() == data
                print(f"8 MiB file over a 1 MB/s link: {'identical' if same else 'DIFFERENT'} in "
                      f"{time.monotonic() - started:.1f}s, {proxy.count(method='GET', match=layer.digest)} "
                      f"Range requests, {client.paths.log_file.read_text().count('ERROR')} errors logged")
            shutil.rmtree(root / "soci", ignore_errors=True)   # nothing cached for the stalled reads
            proxy.clear()
            proxy.add(Fault("drip", match=layer.digest, method="GET", rate=0.05, times=None))
            with running_service(root, config) as client:       # mounts the layer again
                d = client.view_dir(layer.digest, ztoc)
                started = time.monotonic()
                reader = _dd(d / "f.bin", 0)
                _, err = reader.communicate(timeout=600)
                print(f"12 KB read, registry sending 1 byte/20 s: exit {reader.returncode} "
                      f"({_first_line(err)}) after {time.monotonic() - started:.1f}s")
                reader = _dd(d / "f.bin", 400)
                time.sleep(2)
                started = time.monotonic()
                stop = subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), "service",
                                       "stop"], capture_output=True, text=True, timeout=120)
                took = time.monotonic() - started
                _, err = reader.communicate(timeout=60)
                print(f"service stop while a read waits on that registry: exit {stop.returncode} in "
                      f"{took:.2f}s; the read: exit {reader.returncode} ({_first_line(err)})")
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
