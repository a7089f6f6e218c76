"""Compatibility with the reference SOCI tools where lazyoci used to differ:
an image with the same layer twice, the xattr optimisation, and the reference's command names."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image, skopeo_push_layout, write_oci_layout
from helpers.hostile_ztoc import push_index_with
from helpers.lazy import write_config, ztoc_for
from helpers.tree import diff_trees, walk_tree
from helpers.tricky_image import PASSWD, tricky_config, tricky_layers
from lazyoci.errors import FormatError
from lazyoci.oci import mediatypes as mt
from lazyoci.service.client import ServiceClient
from lazyoci.soci.index import (ANN_DISABLE_XATTRS, ANN_LAYER_DIGEST, ANN_LAYER_MEDIA_TYPE, ANN_SPAN_SIZE, EMPTY_CONFIG_DIGEST,
                                SociIndex, go_json)
from lazyoci.store.layout import DataRoot

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
LAYER = "sha256:" + "a" * 64


def _lz(root: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=180)


@contextlib.contextmanager
def _image_mounted(root: Path, config: Path, ref: str, mnt: Path) -> Iterator[Path]:
    """`image mount` of `ref` at `mnt`; then `image unmount` and `service stop`, each checked
    (a refusal there would leave the overlay or the FUSE mount behind)."""
    mnt.mkdir()
    try:
        r = _lz(root, config, "image", "mount", ref, str(mnt))
        assert r.returncode == 0, r.stderr
        try:
            yield mnt
        finally:
            r = _lz(root, config, "image", "unmount", str(mnt))
            assert r.returncode == 0, r.stderr
    finally:
        r = _lz(root, config, "service", "stop")
        assert r.returncode == 0, r.stderr


def _reference_index(ztocs: list[tuple[str, str]]) -> bytes:
    """A v2 index shaped as the reference writes it: one zTOC descriptor per (layer, zTOC) given."""
    return go_json({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.SOCI_INDEX_V2, "digest": EMPTY_CONFIG_DIGEST, "size": 2},
        "layers": [{"mediaType": mt.SOCI_LAYER, "digest": z, "size": 100,
                    "annotations": {ANN_LAYER_MEDIA_TYPE: mt.OCI_LAYER_GZIP, ANN_LAYER_DIGEST: layer,
                                    ANN_SPAN_SIZE: "4194304"}} for layer, z in ztocs],
        "annotations": {"com.amazon.soci.build-tool-identifier": "AWS SOCI CLI v0.2"},
    })


def test_an_index_lists_a_layer_once_per_position_as_the_reference_writes_it():
    """The reference builds one zTOC per layer position, so a layer the image has twice is listed
    twice with the same zTOC; two different zTOCs for one layer stay an error (which to serve?)."""
    z1, z2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    index = SociIndex.parse(_reference_index([(LAYER, z1), ("sha256:" + "b" * 64, z2), (LAYER, z1)]))
    assert [d.annotations[ANN_LAYER_DIGEST] for d in index.ztocs] == [LAYER, "sha256:" + "b" * 64, LAYER]
    assert index.ztoc_for_layer(LAYER).digest == z1
    with pytest.raises(FormatError, match="two different zTOCs"):
        SociIndex.parse(_reference_index([(LAYER, z1), (LAYER, z2)]))


@pytest.mark.needs_root("FUSE, overlay and image mount")
def test_an_image_with_the_same_layer_twice_is_indexed_and_runs_lazily(registry, data_root, tmp_path):
    """Layers 1, 2, 3, then 1 again (it brings back what layer 2 removed): `soci create` lists four
    zTOCs as the reference does, the index is pushed, and a fresh root pulls the image lazily (no
    fallback) and mounts exactly the tree umoci unpacks."""
    layers = tricky_layers()
    layers = layers + [layers[0]]
    layout = tmp_path / "layout"
    write_oci_layout(layout, layers, tricky_config(layers), "latest")
    ref = f"{registry.host}/compat/twice:latest"
    skopeo_push_layout(layout, ref, "latest")
    config = write_config(tmp_path / "config.yaml", extra="snapshotters:\n  - soci\n")
    builder = tmp_path / "builder"
    builder.mkdir()
    r = _lz(builder, config, "pull", "--snapshotter", "overlayfs", ref)
    assert r.returncode == 0, r.stderr
    r = _lz(builder, config, "soci", "create", "--min-layer-size", "0", "--span-size", "65536", ref)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(f"layer {layers[0].digest} -> ztoc") + r.stderr.count(f"layer {layers[0].digest} -> ztoc") == 2
    r = _lz(builder, config, "soci", "push", ref)
    assert r.returncode == 0, r.stderr
    r = _lz(builder, config, "soci", "convert", "--min-layer-size", "0", "--span-size", "65536", ref,
            f"{registry.host}/compat/twice:soci")
    assert r.returncode == 0, r.stderr
    v2 = _lz(builder, config, "soci", "index", "info", r.stdout.split("soci index: ")[1].split()[0])
    listed = [d["annotations"][ANN_LAYER_DIGEST] for d in json.loads(v2.stdout)["layers"]]
    assert listed == [l.digest for l in layers]           # the v2 index too: one zTOC per position
    _lz(builder, config, "service", "stop")

    r = _lz(data_root, config, "pull", ref)
    assert r.returncode == 0 and "INFO" not in r.stderr, r.stderr
    bundle = tmp_path / "umoci"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)], check=True, capture_output=True)
    with _image_mounted(data_root, config, ref, tmp_path / "mnt") as mnt:
        assert (mnt / "etc/passwd").read_bytes() == PASSWD
        problems = diff_trees(walk_tree(bundle / "rootfs", mtimes=True), walk_tree(mnt, mtimes=True))
        assert not problems, "\n".join(problems)
        r = _lz(data_root, config, "images")
        assert "soci" in r.stdout, r.stdout


def _index_of(root: Path, config: Path, ref: str) -> dict:
    r = _lz(root, config, "soci", "index", "list", "--ref", ref, "-q")
    assert r.returncode == 0, r.stderr
    digest = r.stdout.split()[-1]
    r = _lz(root, config, "soci", "index", "info", digest)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.needs_root("FUSE and overlay mounts")
def test_the_xattr_optimization_marks_layers_without_xattrs_and_lazy_mounts_honour_it(registry, data_root,
                                                                                      tmp_path):
    """`--optimizations xattr` writes `com.amazon.soci.disable-xattrs: "true"` on the zTOC descriptor
    of each layer without xattrs or opaque directories (the reference's test), nothing on the others;
    a lazy mount answers no xattr of a marked layer (EOPNOTSUPP, as the reference's mount with
    xattrs off: it is served in the plain mount; nothing fetched) and serves the others'."""
    plain = make_layer([Entry("plain", "dir"), Entry("plain/file", data=b"p" * 5000)])
    with_xattr = make_layer([Entry("x", "dir"), Entry("x/file", data=b"x" * 5000,
                                                pax={"SCHILY.xattr.user.k": "v"})])
    opaque = make_layer([Entry("o", "dir"), Entry("o/.wh..wh..opq"), Entry("o/file", data=b"o")])
    layers = [plain, with_xattr, opaque]
    ref = f"{registry.host}/compat/xattr:latest"
    push_image(registry.host, "compat/xattr", layers, image_config(layers), tmp_path)
    config = write_config(tmp_path / "config.yaml", extra="snapshotters:\n  - soci\n")
    builder = tmp_path / "builder"
    builder.mkdir()
    assert _lz(builder, config, "pull", "--snapshotter", "overlayfs", ref).returncode == 0
    r = _lz(builder, config, "soci", "create", "--min-layer-size", "0", "--optimizations", "bogus", ref)
    assert r.returncode != 0 and "bogus is not a valid optimization" in r.stderr
    r = _lz(builder, config, "soci", "create", "--min-layer-size", "0", "--optimizations", "xattr", ref)
    assert r.returncode == 0, r.stderr
    marks = {d["annotations"]["com.amazon.soci.image-layer-digest"]: d["annotations"].get(ANN_DISABLE_XATTRS)
             for d in _index_of(builder, config, ref)["layers"]}
    assert marks == {plain.digest: "true", with_xattr.digest: None, opaque.digest: None}
    assert _lz(builder, config, "soci", "push", ref).returncode == 0
    _lz(builder, config, "service", "stop")

    assert _lz(data_root, config, "pull", ref).returncode == 0
    with _image_mounted(data_root, config, ref, tmp_path / "mnt") as mnt:
        assert os.getxattr(mnt / "x/file", "user.k") == b"v"
        os.lstat(mnt / "plain/file")         # the lookups check the headers on the way (that fetches)
        st = ServiceClient(DataRoot(data_root), config).status()
        before = {l["layer_digest"]: l["network_bytes"] for l in st["layers"]}
        with pytest.raises(OSError) as e:
            os.getxattr(mnt / "plain/file", "user.k")
        assert e.value.errno == errno.EOPNOTSUPP
        assert os.listxattr(mnt / "plain/file") == []
        st = ServiceClient(DataRoot(data_root), config).status()
        after = {l["layer_digest"]: l["network_bytes"] for l in st["layers"]}
        assert after[plain.digest] == before[plain.digest]
        assert (mnt / "plain/file").read_bytes() == b"p" * 5000


@pytest.mark.needs_root("FUSE and overlay mounts")
def test_a_layer_marked_disable_xattrs_serves_none_of_its_xattrs(registry, data_root, tmp_path):
    """The mark is honoured as the reference honours it (xattrs off for the layer's mount), even on
    a layer that has one: the layer is served in the plain mount, where a getxattr is EOPNOTSUPP
    and the unpack would have the xattr."""
    layer = make_layer([Entry("x", "dir"), Entry("x/file", data=b"x" * 5000, pax={"SCHILY.xattr.user.k": "v"})])
    push_image(registry.host, "compat/xattr-marked", [layer], image_config([layer]), tmp_path)
    push_index_with(registry.host, "compat/xattr-marked", [layer], {layer.digest: ztoc_for(layer)},
                    annotations={layer.digest: {ANN_DISABLE_XATTRS: "True"}})
    ref = f"{registry.host}/compat/xattr-marked:latest"
    config = write_config(tmp_path / "config.yaml", extra="snapshotters:\n  - soci\n")
    r = _lz(data_root, config, "pull", ref)
    assert r.returncode == 0 and "INFO" not in r.stderr, r.stderr
    with _image_mounted(data_root, config, ref, tmp_path / "mnt") as mnt:
        assert (mnt / "x/file").read_bytes() == b"x" * 5000
        assert os.listxattr(mnt / "x/file") == []
        with pytest.raises(OSError) as e:
            os.getxattr(mnt / "x/file", "user.k")
        assert e.value.errno == errno.EOPNOTSUPP


@pytest.mark.needs_root("pulls unpack layers owned by root")
def test_reference_spellings_index_rm_by_ref_and_rebuild_db(registry, data_root, tmp_path):
    """`soci index ls`/`remove`, `soci ztoc ls` as the reference spells them; `soci index rm --ref`
    removes the indexes of one image; `soci rebuild-db` records again, from the blobs, the indexes
    of local images (v1 through their subject, v2 through the converted manifest's annotation)
    and their zTOCs, after the records were lost."""
    import random
    import re
    import sqlite3

    layers = [make_layer([Entry("d.bin", data=random.Random(7).randbytes(100_000))])]
    push_image(registry.host, "compat/cmds", layers, image_config(layers), tmp_path)
    ref = f"{registry.host}/compat/cmds:latest"
    config = write_config(tmp_path / "config.yaml")

    def ok(*args: str) -> str:
        r = _lz(data_root, config, *args)
        assert r.returncode == 0, (args, r.stderr)
        return r.stdout

    ok("pull", "-q", ref)
    v1 = re.search(r"soci index: (sha256:[0-9a-f]{64})", ok("soci", "create", "--min-layer-size", "0", ref))[1]
    conv = ok("soci", "convert", "--min-layer-size", "0", ref, f"{registry.host}/compat/cmds:soci")
    v2 = re.search(r"soci index: (sha256:[0-9a-f]{64})", conv)[1]
    assert sorted(ok("soci", "index", "ls", "-q").split()) == sorted(ok("soci", "index", "list", "-q").split()) \
        == sorted([v1, v2])
    [ztoc] = ok("soci", "ztoc", "ls", "-q").split()
    assert ok("soci", "ztoc", "list", "-q").split() == [ztoc]

    with sqlite3.connect(data_root / "lazyoci.db") as db:      # the records lost, the blobs kept
        db.execute("DELETE FROM soci_indexes")
        db.execute("DELETE FROM soci_ztocs")
    assert ok("soci", "index", "ls", "-q").strip() == "" and ok("soci", "ztoc", "ls", "-q").strip() == ""
    assert "recorded 2 SOCI indexes and 1 zTOCs" in ok("soci", "rebuild-db")
    assert sorted(ok("soci", "index", "ls", "-q").split()) == sorted([v1, v2])
    assert ok("soci", "ztoc", "ls", "-q").split() == [ztoc]
    assert "recorded 0 SOCI indexes and 0 zTOCs" in ok("soci", "rebuild-db")    # idempotent

    both = _lz(data_root, config, "soci", "index", "rm", "--ref", ref, v1)
    assert both.returncode != 0 and "either index digests or image ref" in both.stderr
    assert ok("soci", "index", "rm", "--ref", ref).split() == [v1]
    assert ok("soci", "index", "ls", "-q").split() == [v2]
    assert ok("soci", "index", "remove", v2).split() == [v2]
    assert ok("soci", "index", "ls", "-q").strip() == ""
