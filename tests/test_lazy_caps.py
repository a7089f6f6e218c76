"""A lazy pull of an image whose SOCI index goes past a cap of lazyoci.ztoc.limits: the zTOC (or
the whole index) is refused with one INFO line naming the limit, the layer is downloaded whole,
and the container runs with the layer's real content. Built with lazyoci's own codec from the
image's real layers and pushed to the real registry as a referrer, as an attacker would."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.fault_proxy import FaultProxy
from helpers.hostile_ztoc import claiming_entries, push_index_with, renamed, ztoc_parts
from helpers.images import Entry, image_config, make_layer, push_image, tar_bytes
from helpers.lazy import write_config
from helpers.tricky_image import layer1_entries
from lazyoci.store.blobs import BlobStore
from lazyoci.store.layout import DataRoot
from lazyoci.ztoc import build_ztoc, limits

pytestmark = pytest.mark.needs_root("FUSE, overlay and runc")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
HELLO = b"hello from the layer's own tar\n"
SPAN = 1 << 16


def _lz(root: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def layers():
    """A busybox base layer and a data layer (its raw tar, for hostile zTOCs of it)."""
    base = make_layer(layer1_entries(), "gzip")
    raw = tar_bytes([Entry("data", kind="dir"), Entry("data/hello.txt", data=HELLO),
                     Entry("data/noise.bin", data=os.urandom(200_000))])
    data = make_layer(raw, "gzip")
    return base, data


def _hostile(kind: str, data) -> bytes:
    if kind == "span":              # what `soci create --span-size 1073741824` made before the cap
        return ztoc_parts(data.blob, 1 << 30).encode()
    parts = ztoc_parts(data.blob, SPAN)
    if kind == "entries":
        return claiming_entries(parts.encode(), limits.MAX_ENTRIES.value + 1)
    if kind == "component":
        return renamed(parts, b"data/hello.txt", b"data/" + b"h" * 256)
    if kind == "nul":
        return renamed(parts, b"data/hello.txt", b"data/hel\0lo.txt")
    raise ValueError(kind)


@pytest.mark.parametrize("kind, named", [("span", "MAX_SPAN_SIZE"), ("entries", "MAX_ENTRIES"),
                                         ("component", "MAX_COMPONENT_BYTES"), ("nul", "NUL byte")])
def test_a_refused_ztoc_makes_its_layer_downloaded_and_the_container_runs(
        registry, data_root, tmp_path, layers, kind, named):
    base, data = layers
    repo = f"caps/{kind}"
    push_image(registry.host, repo, [base, data], image_config([base, data]), tmp_path)
    honest, hostile = build_ztoc(io.BytesIO(base.blob), "gzip", SPAN), _hostile(kind, data)
    push_index_with(registry.host, repo, [base, data], {base.digest: honest, data.digest: hostile})
    ref = f"{registry.host}/{repo}:latest"
    config = write_config(tmp_path / "config.yaml")
    blobs = BlobStore(DataRoot(data_root).ensure())
    try:
        r = _lz(data_root, config, "pull", "--snapshotter", "soci", ref)
        assert r.returncode == 0, r.stderr
        info = [l for l in r.stderr.splitlines() if l.startswith("INFO")]
        assert len(info) == 1 and named in info[0] and data.digest in info[0], r.stderr
        assert "zTOC sha256:" + hashlib.sha256(hostile).hexdigest() in info[0], info
        assert "Traceback" not in r.stderr
        assert blobs.has(data.digest) and not blobs.has(base.digest)   # only the refused layer came whole
        images = _lz(data_root, config, "images")
        assert "soci" in images.stdout, images.stdout                  # the base layer is still lazy

        r = _lz(data_root, config, "run", "--rm", "--snapshotter", "soci", ref, "cat", "/data/hello.txt")
        assert r.returncode == 0, r.stderr
        assert r.stdout.encode() == HELLO
        r = _lz(data_root, config, "run", "--rm", "--snapshotter", "soci", ref, "ls", "/data")
        assert r.stdout.split() == ["hello.txt", "noise.bin"], r.stdout
    finally:
        _lz(data_root, config, "service", "stop")


def test_a_ztoc_descriptor_over_the_size_cap_is_refused_before_it_is_downloaded(
        registry, data_root, tmp_path, layers):
    base, data = layers
    repo = "caps/descriptor"
    push_image(registry.host, repo, [base, data], image_config([base, data]), tmp_path)
    ztoc = build_ztoc(io.BytesIO(data.blob), "gzip", SPAN)
    push_index_with(registry.host, repo, [base, data], {data.digest: ztoc},
                    claimed_sizes={data.digest: limits.MAX_ZTOC_BYTES.value + 1})
    config = write_config(tmp_path / "config.yaml")
    blobs = BlobStore(DataRoot(data_root).ensure())
    ztoc_digest = "sha256:" + hashlib.sha256(ztoc).hexdigest()
    try:
        with FaultProxy(registry.host) as proxy:
            ref = f"{proxy.host}/{repo}:latest"
            r = _lz(data_root, config, "pull", "--snapshotter", "soci", ref)
            assert r.returncode == 0, r.stderr
            info = [l for l in r.stderr.splitlines() if l.startswith("INFO")]
            assert len(info) == 1 and "MAX_ZTOC_BYTES" in info[0] and "no lazy loading" in info[0], r.stderr
            assert proxy.count("GET", match=ztoc_digest) == 0          # never downloaded
            assert blobs.has(data.digest) and blobs.has(base.digest)
            r = _lz(data_root, config, "run", "--rm", "--snapshotter", "soci", ref, "cat", "/data/hello.txt")
            assert r.returncode == 0 and r.stdout.encode() == HELLO, r.stderr
            ps = _lz(data_root, config, "images")
            assert "overlayfs" in ps.stdout, ps.stdout
    finally:
        _lz(data_root, config, "service", "stop")
