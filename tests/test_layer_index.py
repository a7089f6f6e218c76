"""The seam between the lazy filesystem and the zTOC: fs/ sees a layer index, ztoc/ implements it."""

from __future__ import annotations

import ast
import hashlib
import io
import os
from pathlib import Path

import pytest

import lazyoci.fs
from helpers.images import Layer
from helpers.tricky_image import tricky_layers
from lazyoci.errors import IntegrityError
from lazyoci.fs.layer_index import LayerIndex
from lazyoci.fs.tree import DIR, WHITEOUT, LayerTree
from lazyoci.oci.whiteout import normalise
from lazyoci.ztoc import Ztoc, build_ztoc, decompress_span, verify_span

FS = Path(lazyoci.fs.__file__).parent
ZTOC_FORMAT = {"lazyoci.ztoc", "lazyoci.ztoc.codec", "lazyoci.ztoc.reader", "lazyoci.ztoc.spans",
               "lazyoci.ztoc.zinfo"}


def _ztoc(layer: Layer) -> tuple[bytes, Ztoc]:
    compression = "gzip" if layer.media_type.endswith("gzip") else "none"
    data = build_ztoc(io.BytesIO(layer.blob), compression, 64 << 10)
    return data, Ztoc.parse(data)


@pytest.fixture(scope="module")
def ztocs() -> list[tuple[bytes, Ztoc]]:
    return [_ztoc(layer) for layer in tricky_layers()]


def test_a_ztoc_is_a_layer_index(ztocs):
    for _, z in ztocs:
        assert isinstance(z, LayerIndex)


def test_the_fast_name_readers_agree_with_whole_entries(ztocs):
    """What the tree is built from and looks names up with is what the decoded entries say."""
    for _, z in ztocs:
        entries = [z.entry(i) for i in range(len(z))]
        assert [z.entry_name(i) for i in range(len(z))] == [os.fsencode(e.name) for e in entries]
        assert list(z.tree_entries()) == [
            (os.fsencode(e.name), e.type, os.fsencode(e.linkname) if e.type == "hardlink" else b"")
            for e in entries]
        with pytest.raises(IndexError):
            z.entry_name(len(z))
    assert any(typ == "hardlink" for _, typ, _ in ztocs[0][1].tree_entries())


def test_the_index_digest_is_that_of_its_bytes(ztocs):
    data, z = ztocs[0]
    assert z.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    given = "sha256:" + "ab" * 32          # a digest the caller verified already is kept as given
    assert Ztoc.parse(data, digest=given).digest == given


def test_the_index_verifies_and_decodes_its_own_spans(ztocs):
    for layer, (_, z) in zip(tricky_layers(), ztocs):
        for i in range(z.num_spans):
            c0, c1 = z.span_compressed_range(i)
            piece = layer.blob[c0:c1]
            z.verify_span(i, piece)
            assert z.decompress_span(i, piece) == decompress_span(z, i, piece)
            verify_span(z, i, piece)
        bad = bytearray(layer.blob[slice(*z.span_compressed_range(0))])
        bad[0] ^= 0xFF
        with pytest.raises(IntegrityError):
            z.verify_span(0, bytes(bad))


def test_the_tree_is_built_from_the_index_alone(ztocs):
    """Layer 2 of the tricky image: whiteouts and an opaque directory, through the index."""
    _, z = ztocs[1]
    tree = LayerTree(z)
    nodes = {path: n for path, n in tree.walk()}
    whiteouts = {p for p, n in nodes.items() if tree.kind[n] == WHITEOUT}
    assert whiteouts, "the tricky image's second layer has whiteouts"
    names = {normalise(z.entry(i).name) for i in range(len(z))}
    for path in whiteouts:          # each is a `.wh.` entry of the index, shown by the name it hides
        d, _, base = path.decode().rpartition("/")
        assert f"{d}/.wh.{base}".lstrip("/") in names, path
    assert tree.opaque and all(tree.kind[d] == DIR for d in tree.opaque)
    assert not any(b".wh." in p for p in nodes)


def test_the_entries_behind_a_node_name_each_entry_once(ztocs):
    """What a node's header check checks: its own entry, its hardlink target's, its opaque
    markers' and its directories', none twice (each named is checked)."""
    hardlinks = 0
    for _, z in ztocs:
        tree = LayerTree(z)
        for _, n in tree.walk():
            behind = tree.entries_behind(n)
            assert len(behind) == len(set(behind)), (n, behind)
            want: set[int] = set()
            m = n
            while True:
                want.update(e for e in (tree.entry[m], tree.entry[tree.target[m]]) if e >= 0)
                want.update(tree.opaque.get(m, ()))
                if m <= 0:
                    break
                m = tree.parent[m]
            assert set(behind) == want, n
            hardlinks += tree.target[n] != n
    assert hardlinks, "the tricky image has hardlinks"


def test_fs_knows_no_ztoc_format():
    """fs/ reads layer indexes through fs/layer_index.py only: no module of it imports the zTOC's
    reader, codec or spans (a new lazy format then touches no file of fs/)."""
    for path in sorted(FS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            assert not names & ZTOC_FORMAT, f"{path.name} imports {sorted(names & ZTOC_FORMAT)}"
