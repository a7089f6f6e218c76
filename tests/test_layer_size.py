"""A pulled layer's uncompressed size (SIZE in `images`) is counted by the one inflate of the pull.

The gzip layer here ends in zero padding after its member, as tape-blocked tools
write it: a gzip reader skips the padding, so the layer unpacks, and its size is
the tar's size whether a snapshotter unpacked it during the pull or not.
"""

from __future__ import annotations

import gzip
import os

import pytest
import zstandard

from helpers.images import LAYER_GZIP, Entry, Layer, image_config, make_layer, push_image, sha, tar_bytes
from lazyoci.images.service import ImageService
from lazyoci.snapshot.overlay import OverlaySnapshotter
from lazyoci.snapshot.unpack import apply_layer_stream
from lazyoci.store.layout import DataRoot


def _tar() -> bytes:
    me = {"uid": os.getuid(), "gid": os.getgid()}      # unpackable without root
    return tar_bytes([Entry("d", "dir", **me), Entry("d/f", data=os.urandom(300_000), **me),
                      Entry("z", data=bytes(2 << 20), **me)])


def _padded_gzip_layer(raw: bytes) -> Layer:
    return Layer(gzip.compress(raw, mtime=0) + bytes(4096), sha(raw), LAYER_GZIP)


def _blobs(raw: bytes) -> dict[str, tuple[bytes, str]]:
    half = len(raw) // 2
    return {
        "none": (raw, "application/vnd.oci.image.layer.v1.tar"),
        "gzip": (gzip.compress(raw), LAYER_GZIP),
        "gzip, two members (pigz)": (gzip.compress(raw[:half]) + gzip.compress(raw[half:]), LAYER_GZIP),
        "gzip, zero padding": (gzip.compress(raw) + bytes(4096), LAYER_GZIP),
        "zstd, two frames": (zstandard.ZstdCompressor().compress(raw[:half])
                             + zstandard.ZstdCompressor().compress(raw[half:]),
                             "application/vnd.oci.image.layer.v1.tar+zstd"),
    }


@pytest.mark.parametrize("kind", list(_blobs(b"")))
def test_the_unpack_returns_the_uncompressed_size_with_the_diff_id(tmp_path, kind):
    raw = _tar()
    blob, media_type = _blobs(raw)[kind]
    got = apply_layer_stream([blob[i:i + 65536] for i in range(0, len(blob), 65536)], media_type, tmp_path)
    assert (got.diff_id, got.size) == (sha(raw), len(raw))
    assert (tmp_path / "d" / "f").stat().st_size == 300_000


@pytest.mark.parametrize("unpack_while_pulling", [True, False], ids=["overlayfs snapshotter", "plain pull"])
def test_images_shows_the_uncompressed_size_of_a_padded_gzip_layer(registry, tmp_path, data_root,
                                                                    unpack_while_pulling):
    raw = _tar()
    small = make_layer([Entry("etc/x", data=b"x", uid=os.getuid(), gid=os.getgid())])
    layers = [_padded_gzip_layer(raw), small]
    repo = f"size/padded-{'unpacked' if unpack_while_pulling else 'plain'}"
    push_image(registry.host, repo, layers, image_config(layers, cmd=["/x"]), tmp_path)
    root = DataRoot(data_root)
    images = ImageService(root)
    try:
        consumer = OverlaySnapshotter(root).layer_consumer if unpack_while_pulling else None
        images.pull(f"{registry.host}/{repo}:latest", layer_consumer=consumer)
        row = next(r for r in images.list() if r.repository.endswith(repo))
        assert images.records.layer_sizes([layers[0].digest]) == {layers[0].digest: len(raw)}
        assert row.size == len(raw) + len(tar_bytes([Entry("etc/x", data=b"x")]))
    finally:
        images.close()
