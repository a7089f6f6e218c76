"""Helpers of the lazy-loading tests: zTOCs for test layers, a service per test, overlay mounts."""

from __future__ import annotations

import io
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lazyoci.service.client import ServiceClient
from lazyoci.store.blobs import BlobStore
from lazyoci.store.layout import DataRoot
from lazyoci.ztoc import build_ztoc

from helpers.images import LAYER_TAR, Layer


def push_soci_index(registry_host: str, repo: str, work: Path, span_size: int = 64 << 10,
                    min_layer_size: int = 0) -> str:
    """Index an image already in the registry with lazyoci's SOCI builder (in a data root of its
    own, so the test's root stays empty) and push the v1 index; returns its digest."""
    from lazyoci.images.service import ImageService
    from lazyoci.oci.reference import Reference
    from lazyoci.soci import SociBuildOptions, index_local_image, push_index

    images = ImageService(DataRoot(work / f"builder-{repo.replace('/', '_')}"))
    try:
        ref = f"{registry_host}/{repo}:latest"
        image = images.pull(ref)
        result = index_local_image(images, image, SociBuildOptions(span_size=span_size, min_layer_size=min_layer_size))
        push_index(images.client, Reference.parse(ref), images.blobs, result.index)
        return result.digest
    finally:
        images.close()


def ztoc_for(layer: Layer, span_size: int = 1 << 22) -> bytes:
    """The zTOC of a test layer, built by lazyoci.ztoc's builder."""
    compression = "none" if layer.media_type == LAYER_TAR else "gzip"
    return build_ztoc(io.BytesIO(layer.blob), compression, span_size=span_size)


def store_ztoc(root: Path, data: bytes) -> str:
    """Put zTOC bytes in the data root's blob store (where the service reads them)."""
    return BlobStore(DataRoot(root).ensure()).put_bytes(data)


def write_config(path: Path, background: bool = False, quiet: float = 30.0, interval_ms: int = 500,
                 extra: str = "") -> Path:
    path.write_text(
        "soci:\n"
        f"  background_fetch: {'true' if background else 'false'}\n"
        f"  background_quiet_seconds: {quiet}\n"
        f"  background_interval_ms: {interval_ms}\n" + extra)
    return path


@contextmanager
def running_service(root: Path, config: Path | None) -> Iterator[ServiceClient]:
    """A lazyoci service for one test; stopped (FUSE unmounted) whatever happens."""
    client = ServiceClient(DataRoot(root), config)
    client.start()
    try:
        yield client
    finally:
        client.stop()
        mnts = (DataRoot(root).service / "mnt", DataRoot(root).service / "mnt-plain")
        still = [l for l in Path("/proc/self/mountinfo").read_text().splitlines()
                 if any(f" {mnt} " in l for mnt in mnts)]
        for mnt in mnts if still else ():   # never leave a mount behind, even when the service misbehaved
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        assert not still, f"the service left its mounts behind: {still}"


@contextmanager
def overlay(lowers: list[Path], target: Path) -> Iterator[Path]:
    """A read-only overlay of `lowers` (top first) at target, unmounted afterwards."""
    target.mkdir(parents=True, exist_ok=True)
    if len(lowers) < 2:
        empty = target.parent / (target.name + "-empty")
        empty.mkdir(exist_ok=True)
        lowers = lowers + [empty]
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    "lowerdir=" + ":".join(str(p) for p in lowers), str(target)],
                   check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


def wait_fetches_settle(requests: list) -> None:
    """Until a span manager's read-ahead requests (appended to `requests` by its fetch function)
    stop coming and its cache writer has stored every span fetched."""
    import time
    from lazyoci.fs.span_fetcher import flush_cache_writes
    seen = -1
    while seen != len(requests):
        seen = len(requests)
        time.sleep(0.3)
        flush_cache_writes()
