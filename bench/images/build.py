#!/usr/bin/env python3
"""Build the benchmark images as OCI image layouts under bench/cache/<name>/ (skopeo: oci:<dir>:latest).

    python3 bench/images/build.py [--force] [python-ml big-file many-files]

An image already built is kept (bench/cache/<name>/bench.json says it is complete) unless an
older builder made it (LAYOUT_VERSION); --force rebuilds it. Each image's bench.json records the
build time, the bytes its workload really needs (for the floor) and the manifest digest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import big_file  # noqa: E402
import many_files  # noqa: E402
import python3_small  # noqa: E402
import python_ml  # noqa: E402

BUILDERS = {"python-ml": python_ml, "big-file": big_file, "many-files": many_files, "python3": python3_small}
CACHE = HERE.parent / "cache"
# raised when the builders make other bytes: 2, layers end after their end-of-archive blocks
LAYOUT_VERSION = 2


def image_dir(name: str) -> Path:
    return CACHE / name


def manifest_of(name: str) -> dict:
    """The image manifest of a cached build (the layout's one manifest)."""
    layout = image_dir(name)
    digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    return json.loads((layout / "blobs" / Path(*digest.split(":"))).read_text())


def load_meta(name: str) -> dict | None:
    meta = image_dir(name) / "bench.json"
    return json.loads(meta.read_text()) if meta.exists() else None


def ensure(name: str, force: bool = False) -> dict:
    """Build `name` unless a complete build is cached; returns its bench.json."""
    meta = load_meta(name)
    if meta and not force and meta.get("layout_version", 1) == LAYOUT_VERSION:
        return meta
    out = image_dir(name)
    if out.exists():
        shutil.rmtree(out)
    work = CACHE / "work" / name
    t0 = time.monotonic()
    info = BUILDERS[name].build(out, work)
    info["build_seconds"] = round(time.monotonic() - t0, 1)
    info["image"] = name
    info["workload"] = BUILDERS[name].CMD
    info["layout_version"] = LAYOUT_VERSION
    shutil.rmtree(work, ignore_errors=True)
    (out / "bench.json").write_text(json.dumps(info, indent=2))
    print(f"{name}: built in {info['build_seconds']}s", flush=True)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("images", nargs="*", help=f"any of {', '.join(BUILDERS)} (default: all)")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--remeasure", action="store_true",
                    help="python-ml: measure what its workload reads again (umoci unpack + strace + fincore)")
    args = ap.parse_args()
    unknown = [n for n in args.images if n not in BUILDERS]
    if unknown:
        ap.error(f"unknown image {unknown[0]!r} (choose from {', '.join(BUILDERS)})")
    for name in args.images or list(BUILDERS):
        meta = ensure(name, args.force)
        if args.remeasure and name == "python-ml":
            meta.update(python_ml.remeasure(image_dir(name), CACHE / "work" / name))
            shutil.rmtree(CACHE / "work" / name, ignore_errors=True)
            (image_dir(name) / "bench.json").write_text(json.dumps(meta, indent=2))
            print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
