"""The whiteout rules live once (oci/whiteout.py): the unpacker and the lazy tree agree on them."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from helpers.tricky_image import tricky_layers
from lazyoci.fs.tree import WHITEOUT, LayerTree
from lazyoci.oci.whiteout import (OPAQUE_MARKER, OPAQUE_XATTR, is_opaque_marker, is_overlay_xattr,
                                  normalise, whiteout_target)
from lazyoci.snapshot.unpack import apply_layer_stream
from lazyoci.ztoc import Ztoc, build_ztoc


@pytest.mark.parametrize("base, hidden", [
    (".wh.foo", "foo"), (".wh..hidden", ".hidden"), (".wh..wh.x", ".wh.x"),
    (OPAQUE_MARKER, None), ("foo", None), ("a.wh.b", None),
    (".wh.", ""), (".wh..", "."), (".wh...", ".."),     # malformed: the caller refuses them
])
def test_whiteout_target(base, hidden):
    assert whiteout_target(base) == hidden


def test_the_opaque_marker_and_overlay_xattrs():
    assert is_opaque_marker(".wh..wh..opq") and not is_opaque_marker(".wh.opq")
    assert is_overlay_xattr(OPAQUE_XATTR) and is_overlay_xattr("trusted.overlay.redirect")
    assert not is_overlay_xattr("trusted.other") and not is_overlay_xattr("user.overlay.opaque")


@pytest.mark.parametrize("name, path", [
    ("./a/b/", "a/b"), ("a//b/./c", "a/b/c"), ("/etc/x", "etc/x"), ("./", ""), (".", ""),
    ("a/../b", None), ("..", None), ("a/..b", "a/..b"),
])
def test_normalise(name, path):
    assert normalise(name) == path


def _unpacked(root: Path) -> tuple[set[str], set[str], set[str]]:
    """(every path, the whiteouts, the opaque directories) of an unpacked layer."""
    paths, whiteouts, opaque = set(), set(), set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            paths.add(rel)
            st = os.lstat(full)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                whiteouts.add(rel)
            if name in dirnames and OPAQUE_XATTR in os.listxattr(full, follow_symlinks=False):
                opaque.add(rel)
    return paths, whiteouts, opaque


def _lazy(layer) -> tuple[set[str], set[str], set[str]]:
    compression = "gzip" if layer.media_type.endswith("gzip") else "none"
    tree = LayerTree(Ztoc.parse(build_ztoc(io.BytesIO(layer.blob), compression)))
    nodes = {os.fsdecode(p): n for p, n in tree.walk() if tree.parent[n] >= 0}
    return (set(nodes), {p for p, n in nodes.items() if tree.kind[n] == WHITEOUT},
            {p for p, n in nodes.items() if n in tree.opaque})


@pytest.mark.needs_root("whiteouts are 0:0 character devices: mknod")
@pytest.mark.parametrize("which", [1, 2])
def test_the_lazy_tree_and_the_unpacker_apply_the_same_rules(tmp_path, which):
    """Layers 2 and 3 of the tricky image whiteout files and directories and make one opaque."""
    layer = tricky_layers()[which]
    dest = tmp_path / "layer"
    dest.mkdir()
    apply_layer_stream(layer.blob, layer.media_type, dest)
    unpacked, lazy = _unpacked(dest), _lazy(layer)
    assert unpacked[1], "the layer has whiteouts"
    assert lazy == unpacked
