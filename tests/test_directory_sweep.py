"""A directory's sweep (fs/layer_fs.py `_sweep`): the first name looked up in a directory has the
service check the children whose tar headers are cached, so that the session holder answers
their lookups. Children whose headers are not cached are left for a later sweep without their
zTOC entries being decoded, and the next sweep after the cache has grown checks them."""

from __future__ import annotations

import gzip
import io
import random
import types

from helpers.images import Entry, tar_bytes
from lazyoci.fs import layer_fs
from lazyoci.fs.header_check import GOOD, UNCHECKED, LayerVerifier
from lazyoci.fs.tree import LayerTree
from lazyoci.service.holder_reads import ReadMap
from lazyoci.ztoc import Ztoc, build_ztoc

SPAN = 64 << 10


def _swept_layer():
    """A layer of one directory whose files fill several spans, span 0 alone cached; (fs, layer,
    zTOC, the cached spans, which the test may add to)."""
    noise = random.Random(3)
    entries = [Entry("d", "dir")] + [Entry(f"d/f{k:02d}", data=noise.randbytes(20 << 10)) for k in range(24)]
    tar = tar_bytes(entries)
    ztoc = Ztoc.parse(build_ztoc(io.BytesIO(gzip.compress(tar, mtime=0)), "gzip", span_size=SPAN))
    assert ztoc.num_spans >= 4
    cached: set[int] = {0}

    def read_cached(start: int, end: int) -> bytes | None:
        return tar[start:end] if all(i in cached for i in ztoc.spans_for(start, end)) else None

    tree = LayerTree(ztoc)
    verifier = LayerVerifier(ztoc, lambda s, e: tar[s:e], read_cached, "sha256:test")
    cache = types.SimpleNamespace(has=cached.__contains__, cached_bytes=1)
    layer = layer_fs.LazyLayer("sha256:test", tree, types.SimpleNamespace(cache=cache), 0.0, verifier)
    bounds = [ztoc.span_uncompressed_range(i)[0] for i in range(ztoc.num_spans)] + [ztoc.uncompressed_size]
    layer.read_map = ReadMap.create(len(tree), bounds, 3600)
    fs = layer_fs.LayerFS()
    fs.add_layer(layer)
    return fs, layer, ztoc, cached


def _header_span(ztoc: Ztoc, i: int) -> int:
    offset = ztoc.entry_extent(i)[0]
    return ztoc.spans_for(offset - 1, offset)[0]


def test_a_sweep_checks_the_children_whose_headers_are_cached_and_leaves_the_others_undecoded():
    fs, layer, ztoc, cached = _swept_layer()
    d = layer.tree.lookup(0, b"d")
    assert d is not None
    fs._sweep(layer, 0)                           # the lookup of d in the root checks d
    fs._sweep(layer, d)
    files = [i for i in range(len(ztoc)) if ztoc.entry(i).name.startswith("d/f")]
    in_cache = [i for i in files if _header_span(ztoc, i) in cached]
    assert in_cache and len(in_cache) < len(files)
    for i in files:
        if i in in_cache and _header_span(ztoc, i - 1) in cached:
            assert layer.verifier.state[i] == GOOD, ztoc.entry(i).name
        elif i not in in_cache:
            assert layer.verifier.state[i] == UNCHECKED, ztoc.entry(i).name
            assert i not in layer.verifier._decoded, "an entry whose header is not cached was decoded"

    cached.update(range(ztoc.num_spans))          # the cache has grown: the next sweep checks the rest
    layer.fetcher.cache.cached_bytes = 2
    fs._sweep(layer, d)
    assert all(layer.verifier.state[i] == GOOD for i in files)
    for i in files:
        node = layer.tree.lookup(d, ztoc.entry(i).name.split("/")[-1].encode())
        assert node is not None and layer.read_map.entry_published(node)
