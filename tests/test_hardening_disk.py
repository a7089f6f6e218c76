"""A full disk under the data root (a small tmpfs mounted as --root).

A pull that does not fit fails with one clear error naming the lack of space, leaves no
partial blob, and a later pull after space was freed works. The span cache on a full disk
keeps serving verified reads (or fails them with EIO), never wrong bytes, and holds nothing
wrong once space is back.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import running_service, store_ztoc, write_config, ztoc_for
from helpers.store_check import assert_store_consistent

pytestmark = pytest.mark.needs_root("tmpfs and FUSE mounts")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
FILES = {f"data/f{i}.bin": os.urandom(300 << 10) for i in range(8)}     # 2.4 MiB, incompressible


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at path, unmounted afterwards whatever happens."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def _fill(disk: Path) -> Path:
    """Take every free byte of the disk with one file; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    layer = make_layer([Entry("data/", kind="dir")] + [Entry(n, data=d) for n, d in FILES.items()])
    push_image(registry.host, "hardening/disk", [layer], image_config([layer]), tmp_path_factory.mktemp("disk"))
    return layer


def test_pull_onto_a_full_disk_fails_clearly_and_works_after_space_is_freed(registry, image, tmp_path):
    ref = f"{registry.host}/hardening/disk:latest"
    with small_disk(tmp_path / "disk", "1536k") as root:
        r = subprocess.run([LAZYOCI, "--root", str(root), "pull", ref], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert any(w in lines[0] for w in ("disk full", "No space left on device", "ENOSPC")), lines[0]
        assert not (root / "blobs/sha256" / image.digest.split(":")[1]).exists()
        assert not list((root / "tmp").glob("*")), "a partial download was left on the full disk"
        subprocess.run(["mount", "-o", "remount,size=16m", str(root)], check=True)
        r = subprocess.run([LAZYOCI, "--root", str(root), "pull", ref], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert (root / "blobs/sha256" / image.digest.split(":")[1]).read_bytes() == image.blob
        assert_store_consistent(root)


def test_span_cache_on_a_full_disk_serves_verified_bytes_or_eio(registry, image, tmp_path, monkeypatch):
    ztoc = ztoc_for(image, span_size=64 << 10)
    with small_disk(tmp_path / "disk", "8m") as root:
        monkeypatch.setenv("LAZYOCI_ROOT", str(root))
        zdigest = store_ztoc(root, ztoc)
        config = write_config(tmp_path / "c.yaml")
        ref = f"{registry.host}/hardening/disk:latest"
        with running_service(root, config) as client:
            d = client.mount_layer(ref, image.digest, zdigest)
            filler = _fill(root)
            for _round in range(2):              # twice: what a failed cache write left is read back
                for name, data in FILES.items():
                    try:
                        got = (d / name).read_bytes()
                    except OSError as e:
                        assert e.errno == errno.EIO, e
                        continue
                    assert got == data, f"{name}: wrong bytes served from a cache on a full disk"
            assert "No space left on device" in client.paths.log_file.read_text(), \
                "the span cache never met the full disk: the case was not exercised"
            filler.unlink()
            assert all((d / n).read_bytes() == data for n, data in FILES.items())
        with running_service(root, config):     # the cache kept on disk holds nothing wrong; the
            # restarted service mounts the layer again at the same directory
            assert all((d / n).read_bytes() == data for n, data in FILES.items())
