"""The lazyoci service's peak memory (VmHWM) for one lazy read, by the span size of the index.

    python bench/span_memory.py --span-size 1073741824 --read head   # the issue's case
    python bench/span_memory.py --span-size 67108864 --read all      # an index at the cap

Pushes an image (a busybox layer and a layer holding one file of --layer-mib MiB) to a
local registry with a SOCI index whose zTOC for the big layer has the given span size
(built with lazyoci's codec, so sizes over the builder's cap can be measured too), pulls
it with `--snapshotter soci`, runs `head -c 6` (or `cat` of the whole file) in a
container, and prints the service's VmHWM and how the pull went, as one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import localreg  # noqa: E402
from helpers.hostile_ztoc import push_index_with, ztoc_parts  # noqa: E402
from helpers.images import Entry, image_config, make_layer, push_image  # noqa: E402
from helpers.tricky_image import layer1_entries  # noqa: E402

from lazyoci.ztoc import build_ztoc  # noqa: E402

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--span-size", type=int, default=1 << 30)
    ap.add_argument("--layer-mib", type=int, default=256)
    ap.add_argument("--read", choices=("head", "all"), default="head")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="span-memory-"))
    reg = localreg.start_registry(work / "registry")
    root, cfg = work / "root", work / "config.yaml"
    cfg.write_text("soci:\n  background_fetch: false\n")

    def lz(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run([LAZYOCI, "--root", str(root), "--config", str(cfg), *a],
                              capture_output=True, text=True, timeout=900)
    try:
        base = make_layer(layer1_entries(), "gzip")
        big = make_layer([Entry("big", kind="dir"), Entry("big/file.bin", data=bytes(args.layer_mib << 20))])
        push_image(reg.host, "mem/span", [base, big], image_config([base, big]), work)
        ztocs = {base.digest: build_ztoc(io.BytesIO(base.blob), "gzip"),
                 big.digest: ztoc_parts(big.blob, args.span_size).encode()}
        push_index_with(reg.host, "mem/span", [base, big], ztocs)
        ref = f"{reg.host}/mem/span:latest"
        pull = lz("pull", "--snapshotter", "soci", ref)
        cmd = ["head", "-c", "6", "/big/file.bin"] if args.read == "head" else \
              ["sh", "-c", "cat /big/file.bin | wc -c"]
        run = lz("run", "--rm", "--snapshotter", "soci", ref, *cmd)
        pid_file = root / "service/lazyoci.pid"
        hwm = None
        if pid_file.exists():
            pid = pid_file.read_text().split()[0]
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) // 1024
        print(json.dumps({"span_size": args.span_size, "layer_mib": args.layer_mib, "read": args.read,
                          "pull_rc": pull.returncode, "info": [l for l in pull.stderr.splitlines() if "INFO" in l],
                          "run_rc": run.returncode, "run_out": run.stdout.strip()[:40],
                          "service_vmhwm_mib": hwm}))
    finally:
        lz("service", "stop")
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
