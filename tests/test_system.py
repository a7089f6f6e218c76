"""`system df` and `system prune [-a]` over a real data root: containers through runc, images,
buildah's build cache, and the span caches of lazy layers served by the real service."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import push_soci_index, write_config
from helpers.tricky_image import push_tricky_image

pytestmark = [pytest.mark.needs_root("FUSE, overlay and runc"),
              pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah is not installed")]
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def _lz(root: Path, config: Path, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), *args], input=stdin,
                       capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"lazyoci {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


def _df(root: Path, config: Path) -> dict[str, dict]:
    rows = [json.loads(l) for l in _lz(root, config, "system", "df", "--format", "json").stdout.splitlines()]
    return {r["Type"]: r for r in rows}


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [l.split()[4] for l in f if l.split()[4].startswith(str(root))]


def _caches_of(cache: Path, layer: str) -> list[Path]:
    """The span cache directories of a layer (one per zTOC: `<layer hex>-<zTOC hex prefix>`)."""
    return [p for p in cache.glob(layer.split(":")[1] + "*") if p.is_dir()]


def _lazy_image(registry, repo: str, work: Path) -> tuple[str, str]:
    """An image of one indexed layer of random data: (reference, layer digest)."""
    layer = make_layer([Entry("data.bin", data=os.urandom(400_000))])
    push_image(registry.host, repo, [layer], image_config([layer]), work)
    push_soci_index(registry.host, repo, work)
    return f"{registry.host}/{repo}:latest", layer.digest


def _warm(root: Path, config: Path, ref: str, mnt: Path) -> None:
    """Mount the image lazily and read its data, so that its span cache fills."""
    _lz(root, config, "image", "mount", "--snapshotter", "soci", ref, str(mnt))
    try:
        assert len((mnt / "data.bin").read_bytes()) == 400_000
    finally:
        _lz(root, config, "image", "unmount", str(mnt))


def test_df_and_prune(registry, data_root, tmp_path):
    config = write_config(tmp_path / "config.yaml")
    push_tricky_image(registry.host, "system/tricky", tmp_path)
    tricky = f"{registry.host}/system/tricky:latest"
    kept, kept_layer = _lazy_image(registry, "system/lazy-kept", tmp_path)
    gone, gone_layer = _lazy_image(registry, "system/lazy-gone", tmp_path)
    other = make_layer([Entry("other.txt", data=b"other\n")])
    push_image(registry.host, "system/other", [other], image_config([other]), tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = data_root / "soci" / "cache"
    try:
        running = _lz(data_root, config, "run", "-d", tricky, "sleep", "60").stdout.strip()
        exited = _lz(data_root, config, "run", "-d", tricky, "true").stdout.strip()
        deadline = time.monotonic() + 120                       # a hang detector, not a timing
        while _lz(data_root, config, "ps", "-q").stdout.split() != [running[:12]]:
            assert time.monotonic() < deadline, "`run -d true` never exited"
            time.sleep(0.2)
        _lz(data_root, config, "pull", f"{registry.host}/system/other:latest")
        _lz(data_root, config, "tag", f"{registry.host}/system/other:latest", "system/named-unused")
        _lz(data_root, config, "rmi", f"{registry.host}/system/other:latest")
        _warm(data_root, config, kept, mnt)
        _warm(data_root, config, gone, mnt)
        _lz(data_root, config, "rmi", gone)
        assert _caches_of(cache, gone_layer)                     # the cache outlives its image
        ctx = tmp_path / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(f"FROM {tricky}\nRUN echo built > /built\n")
        _lz(data_root, config, "build", "-q", str(ctx))            # unnamed: pruned without -a

        dead = subprocess.Popen(["true"])
        dead.wait()
        killed = data_root / "build" / f"out-{dead.pid}-x"     # what a build killed mid-way left
        live = data_root / "build" / f"out-{os.getpid()}-x"    # a build still running
        for d in (killed, live):
            d.mkdir()
            (d / "image.tar").write_bytes(b"x" * 100_000)

        df = _df(data_root, config)
        assert df["Containers"]["TotalCount"] == 2 and df["Containers"]["Active"] == 1, df
        assert 0 < df["Containers"]["Reclaimable"] < df["Containers"]["Size"], df
        assert df["Images"]["TotalCount"] == 4, df
        assert df["Images"]["Active"] == 1 and df["Images"]["Reclaimable"] < df["Images"]["Size"], df
        assert df["Span Cache"]["TotalCount"] == 2 and df["Span Cache"]["Active"] == 1, df
        assert df["Span Cache"]["Reclaimable"] >= 400_000, df
        assert df["Build Cache"]["Size"] > 0 and df["Build Cache"]["TotalCount"] > 0, df
        table = _lz(data_root, config, "system", "df").stdout.splitlines()
        assert table[0].split() == ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"], table

        # No answer, or "n": nothing is removed.
        for answer in (None, "n\n"):
            r = _lz(data_root, config, "system", "prune", stdin=answer)
            assert "WARNING!" in r.stderr and "Deleted" not in r.stdout, (r.stdout, r.stderr)
        assert _df(data_root, config) == df

        r = _lz(data_root, config, "system", "prune", stdin="y\n")
        assert f"Deleted Containers:\n{exited}\n" in r.stdout, r.stdout
        assert running not in r.stdout
        assert "deleted: sha256:" in r.stdout and "system/named-unused" not in r.stdout, r.stdout
        assert f"Deleted Span Caches:\n{gone_layer}\n" in r.stdout, r.stdout
        assert "Total reclaimed space:" in r.stdout.splitlines()[-1]
        assert not _caches_of(cache, gone_layer)
        assert not killed.exists() and live.exists()
        assert _caches_of(cache, kept_layer)                     # its image is still here
        df = _df(data_root, config)
        assert df["Containers"]["TotalCount"] == 1 and df["Span Cache"]["TotalCount"] == 1, df
        assert df["Images"]["TotalCount"] == 3 and df["Build Cache"]["TotalCount"] == 0, df
        _lz(data_root, config, "run", "--rm", tricky, "true")     # the running container's image still runs

        r = _lz(data_root, config, "system", "prune", "-a", "-f")
        assert "untagged: docker.io/system/named-unused:latest" in r.stdout, r.stdout
        assert f"untagged: {kept}" in r.stdout and tricky not in r.stdout, r.stdout
        assert f"Deleted Span Caches:\n{kept_layer}\n" in r.stdout, r.stdout
        names = _lz(data_root, config, "images", "--format", "json").stdout.splitlines()
        assert [json.loads(l)["Name"] for l in names] == [tricky], names
        assert _lz(data_root, config, "ps", "-a", "-q").stdout.split() == [running[:12]]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        for c in _lz(data_root, config, "ps", "-a", "-q", check=False).stdout.split():
            _lz(data_root, config, "rm", "-f", c, check=False)
        _lz(data_root, config, "service", "stop", check=False)
    assert _mounts_under(data_root) == []


def test_prune_volumes_removes_unused_anonymous_volumes_only(registry, tmp_path):
    """`system prune --volumes`, as docker 23+: the anonymous volumes no container uses go (also
    those freed by removing stopped containers in the same prune); named volumes stay."""
    root, config = tmp_path / "root", write_config(tmp_path / "config.yaml")
    push_tricky_image(registry.host, "system/vols", tmp_path)
    ref = f"{registry.host}/system/vols:latest"
    _lz(root, config, "volume", "create", "keepme")
    _lz(root, config, "run", "-v", "/scratch", "-v", "keepme:/named", ref, "true")
    before = set(_lz(root, config, "volume", "ls", "-q").stdout.split())
    assert "keepme" in before and len(before) == 2, before
    anonymous = (before - {"keepme"}).pop()
    out = _lz(root, config, "system", "prune", "-f", "--volumes").stdout
    assert f"Deleted Volumes:\n{anonymous}\n" in out, out
    assert _lz(root, config, "volume", "ls", "-q").stdout.split() == ["keepme"]
    assert _mounts_under(root) == []
