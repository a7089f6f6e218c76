"""eStargz layers made by the real converter (`ctr-remote images convert --estargz`), read as
lazy layer indexes: the TOC's entries and chunks, verification of every chunk, and the
refusal of TOCs that lie (each a FormatError or IntegrityError, never wrong bytes)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest

from helpers.estargz import converter, fetch_blob, fetch_manifest, push_estargz
from helpers.images import Entry, make_layer

from lazyoci.errors import FormatError, IntegrityError
from lazyoci.estargz import TOC_DIGEST_ANNOTATION, EStargzIndex, fetch_index, parse_footer
from lazyoci.fs.layer_index import LayerIndex
from lazyoci.oci.manifest import Descriptor
from lazyoci.oci.reference import Reference

pytestmark = pytest.mark.needs_root("containerd (for ctr-remote) runs as root")

BIG = os.urandom(300_000)
ENTRIES = [
    Entry("etc", "dir"),
    Entry("etc/hello", data=b"hello world\n" * 1000),
    Entry("etc/big", data=BIG),
    Entry("etc/empty"),
    Entry("etc/link", "symlink", linkname="hello"),
    Entry("etc/hard", "hardlink", linkname="etc/hello"),
    Entry("etc/.wh.gone"),
    Entry("opq", "dir"),
    Entry("opq/.wh..wh..opq"),
    Entry("x", "dir", mode=0o1777, pax={"SCHILY.xattr.user.foo": "bar"}),
    Entry("x/dev", "char", devmajor=1, devminor=3),
    Entry("x/fifo", "fifo"),
    Entry("x/suid", data=b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=50),
    Entry("x/naïve name", data=b"utf-8\n"),
]


@pytest.fixture(scope="module")
def esgz(registry, tmp_path_factory):
    """(registry host, repo, manifest, layer descriptor, layer blob) of a converted image."""
    work = tmp_path_factory.mktemp("estargz")
    layer = make_layer(ENTRIES)
    with converter() as cd:
        push_estargz(cd, registry.host, "esgz/index", [layer], work, chunk_size=65536)
    manifest = fetch_manifest(registry.host, "esgz/index")
    desc = Descriptor.from_json(manifest["layers"][0])
    return registry.host, "esgz/index", manifest, desc, fetch_blob(registry.host, "esgz/index", desc.digest)


def _index(blob: bytes) -> EStargzIndex:
    toc_offset, _ = parse_footer(blob[-51:])
    return EStargzIndex.parse(blob[toc_offset:])


def test_toc_entries_are_the_layers_entries(esgz):
    _, _, _, desc, blob = esgz
    index = _index(blob)
    assert isinstance(index, LayerIndex)
    assert index.toc_digest == desc.annotations[TOC_DIGEST_ANNOTATION]
    assert not index.headers_in_stream
    got = {index.entry(i).name: index.entry(i) for i in range(len(index))}
    # the view is the whole tar: the converter's landmark and the TOC file too
    assert set(got) == {e.name for e in ENTRIES} | {".no.prefetch.landmark", "stargz.index.json"}
    toc = got["stargz.index.json"]
    assert (toc.type, toc.mode, toc.uid, toc.size) == ("reg", 0, 0, len(_toc_json(blob[index.toc_offset:])))
    kinds = {"file": "reg", "dir": "dir", "symlink": "symlink", "hardlink": "hardlink", "char": "char",
             "fifo": "fifo"}
    for e in ENTRIES:
        g = got[e.name]
        assert g.type == kinds[e.kind], e.name
        assert g.size == len(e.data), e.name
        assert g.mode == (e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)), e.name
        assert (g.uid, g.gid) == (e.uid, e.gid), e.name
        assert g.linkname == e.linkname, e.name
        assert (g.devmajor, g.devminor) == (e.devmajor, e.devminor), e.name
        assert g.mtime_ns == int(e.mtime) * 1_000_000_000, e.name
    assert got["x"].xattrs == {"user.foo": b"bar"}


def test_spans_decode_to_every_files_data_in_order(esgz):
    _, _, _, _, blob = esgz
    index = _index(blob)
    stream = b"".join(index.decompress_span(i, blob[slice(*index.span_compressed_range(i))])
                      for i in range(index.num_spans))
    assert len(stream) == index.uncompressed_size
    for i in range(len(index)):
        e = index.entry(i)
        if e.type == "reg":
            want = {x.name: x.data for x in ENTRIES}.get(e.name)
            if e.name == "stargz.index.json":
                want = _toc_json(blob[index.toc_offset:])
            elif e.name == ".no.prefetch.landmark":
                want = b"\x0f"
            assert stream[e.offset:e.offset + e.size] == want, e.name
    # the big file was cut into 64 KiB chunks, each its own gzip member (span)
    big = next(index.entry(i) for i in range(len(index)) if index.entry(i).name == "etc/big")
    assert len(index.spans_for(big.offset, big.offset + big.size)) == -(-len(BIG) // 65536)
    ranges = [index.span_uncompressed_range(i) for i in range(index.num_spans)]
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_an_altered_byte_inside_a_chunk_is_an_integrity_error(esgz):
    _, _, _, _, blob = esgz
    index = _index(blob)
    big = next(index.entry(i) for i in range(len(index)) if index.entry(i).name == "etc/big")
    i = index.spans_for(big.offset + 70_000, big.offset + 70_001)[0]
    c0, c1 = index.span_compressed_range(i)
    good = index.decompress_span(i, blob[c0:c1])
    raised = 0
    for at in range(c0, c1, max(1, (c1 - c0) // 64)):
        bad = bytearray(blob[c0:c1])
        bad[at - c0] ^= 0x01
        try:     # a byte the chunk does not depend on (a gzip flag, a header after it) is harmless
            assert index.decompress_span(i, bytes(bad)) == good
        except IntegrityError:
            raised += 1
    bad = bytearray(blob[c0:c1])
    bad[(c1 - c0) // 3] ^= 0x01       # inside the chunk's deflate data
    with pytest.raises(IntegrityError):
        index.decompress_span(i, bytes(bad))
    assert raised > 32


def test_fetch_index_checks_the_toc_against_the_annotation(esgz):
    from lazyoci.registry import RegistryClient, RegistryOptions

    host, repo, _, desc, blob = esgz
    ref = Reference.parse(f"{host}/{repo}:latest")
    client = RegistryClient(RegistryOptions(insecure_registries=(host,)))
    try:
        tail, index = fetch_index(client, ref, desc)
        assert blob.endswith(tail) and index.toc_digest == desc.annotations[TOC_DIGEST_ANNOTATION]
        lying = Descriptor(desc.media_type, desc.digest, desc.size,
                           {TOC_DIGEST_ANNOTATION: "sha256:" + "0" * 64})
        with pytest.raises(IntegrityError, match="annotation"):
            fetch_index(client, ref, lying)
    finally:
        client.close()


# ---- TOCs that lie: rebuilt around an edited TOC, each refused when parsed ---------------

def _tail(blob: bytes, edit=None, toc_bytes: bytes | None = None, footer_offset: int | None = None) -> bytes:
    """The blob's tail with its TOC replaced by `edit(toc)` (same TOC offset), as a writer would."""
    toc_offset, _ = parse_footer(blob[-51:])
    toc = json.loads(EStargzIndex.parse(blob[toc_offset:]) and _toc_json(blob[toc_offset:]))
    if edit is not None:
        edit(toc)
    data = toc_bytes if toc_bytes is not None else json.dumps(toc).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("stargz.index.json")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    footer = blob[-51:]
    if footer_offset is not None:
        footer = footer.replace(b"%016x" % toc_offset, b"%016x" % footer_offset)
    return gzip.compress(buf.getvalue(), mtime=0) + footer


def _toc_json(tail: bytes) -> bytes:
    from lazyoci.estargz import read_toc
    return read_toc(tail)[1]


def _reg(toc, name):
    return next(e for e in toc["entries"] if e.get("name") == name and e["type"] == "reg")


def _set(name, key, value):
    return lambda toc: _reg(toc, name).__setitem__(key, value)


@pytest.mark.parametrize("edit, match", [
    (_set("etc/hello", "offset", 1 << 40), "outside the layer's data"),
    (lambda toc: _reg(toc, "etc/big").__setitem__("offset", _reg(toc, "etc/hello")["offset"]), "overlaps"),
    (_set("etc/hello", "name", "../../etc/passwd"), "climbs out"),
    (_set("etc/hello", "name", "/etc/passwd"), "absolute"),
    (_set("etc/hello", "chunkDigest", "md5:abc"), "chunkDigest"),
    (_set("etc/hello", "chunkSize", 1 << 30), "does not follow"),
    (_set("etc/hello", "type", "socket"), "unknown entry type"),
    (lambda toc: toc["entries"].append({"name": "h", "type": "hardlink", "linkName": "nowhere"}), "hardlink"),
    (lambda toc: toc.__setitem__("version", 7), "version"),
])
def test_a_lying_toc_is_refused(esgz, edit, match):
    blob = esgz[4]
    with pytest.raises(FormatError, match=match):
        EStargzIndex.parse(_tail(blob, edit))


def test_a_lying_footer_or_an_absurd_toc_is_refused(esgz):
    blob = esgz[4]
    with pytest.raises(FormatError):
        EStargzIndex.parse(_tail(blob)[:-51] + b"\x1f\x8b" + bytes(49))
    with pytest.raises(FormatError, match="not JSON"):
        EStargzIndex.parse(_tail(blob, toc_bytes=b"{not json"))
    with pytest.raises(FormatError, match="limit"):
        EStargzIndex.parse(bytes(300 << 20))


def test_a_chunk_digest_that_lies_is_an_integrity_error_not_wrong_bytes(esgz):
    blob = esgz[4]
    fake = "sha256:" + hashlib.sha256(b"other").hexdigest()
    tail = _tail(blob, _set("etc/hello", "chunkDigest", fake))
    index = EStargzIndex.parse(tail)
    hello = next(index.entry(i) for i in range(len(index)) if index.entry(i).name == "etc/hello")
    i = index.spans_for(hello.offset, hello.offset + 1)[0]
    with pytest.raises(IntegrityError):
        index.decompress_span(i, blob[slice(*index.span_compressed_range(i))])


@pytest.fixture(scope="module")
def small_files_esgz(registry, tmp_path_factory):
    """(index, blob) of an eStargz layer of 120 small files: a chunk (a span) each."""
    work = tmp_path_factory.mktemp("estargz-small")
    layer = make_layer([Entry("pkg", "dir")] +
                       [Entry(f"pkg/m{i:03}.py", data=os.urandom(3000)) for i in range(120)])
    with converter() as cd:
        push_estargz(cd, registry.host, "esgz/small-files", [layer], work)
    desc = Descriptor.from_json(fetch_manifest(registry.host, "esgz/small-files")["layers"][0])
    blob = fetch_blob(registry.host, "esgz/small-files", desc.digest)
    return _index(blob), blob


def test_a_small_files_miss_reads_its_neighbours_ahead_in_few_requests(small_files_esgz, tmp_path):
    # a file's chunk is its own span: without the neighbours, a start reading one small file after
    # another would make a request (a round trip) for each
    from helpers.lazy import wait_fetches_settle
    from lazyoci.fs import span_fetcher
    from lazyoci.fs.span_cache import SpanCache
    from lazyoci.fs.span_fetcher import SpanFetcher

    index, blob = small_files_esgz
    requests: list[tuple[int, int]] = []

    def fetch(start: int, end: int) -> bytes:
        requests.append((start, end))
        return blob[start:end]

    spans = [index.span_uncompressed_range(i) for i in range(index.num_spans)]
    cache = SpanCache(tmp_path / "cache").layer("sha256:" + "2" * 64, index.digest, spans)
    f = SpanFetcher(index, fetch, cache, "sha256:" + "2" * 64)
    files = {e.name: e for e in (index.entry(i) for i in range(len(index))) if e.type == "reg"}
    first = files["pkg/m010.py"]
    own = index.spans_for(first.offset, first.offset + first.size)
    assert len(own) == 1
    assert f.read(first.offset, first.offset + first.size, ahead_until=first.offset + first.size) == \
        blob_file(blob, index, first)
    wait_fetches_settle(requests)
    fetched = sorted({i for lo, hi in requests for i in range(index.num_spans)
                      if lo <= index.span_compressed_range(i)[0] < hi})
    ahead = [i for i in fetched if i > own[0]]
    assert ahead and ahead == list(range(own[0] + 1, own[0] + 1 + len(ahead))), "the next files' chunks"
    past = sum(index.span_compressed_range(i)[1] - index.span_compressed_range(i)[0] for i in ahead)
    assert past <= span_fetcher.NEIGHBOR_BYTES
    assert len(requests) < 1 + len(ahead) / 2, "neighbours travel several to a request"
    use = f.span_use()          # counted as neighbours (`service status`), none read yet
    assert use.neighbors == len(ahead) and use.neighbors_unread_bytes == past == use.unread_bytes == use.neighbors_bytes
    # the next files are read from the cache, and reading them moves the window on
    waited = f.stats.read_wait
    for k in range(11, 11 + len(ahead)):
        e = files[f"pkg/m{k:03}.py"]
        assert f.read(e.offset, e.offset + e.size, ahead_until=e.offset + e.size) == blob_file(blob, index, e)
    assert f.stats.read_wait == waited, "no read of the neighbours waited for the network"
    wait_fetches_settle(requests)
    use = f.span_use()
    assert use.unread > 0, "the window went on past what was read"
    assert use.neighbors > len(ahead) and 0 < use.neighbors_unread_bytes <= use.unread_bytes
    assert use.neighbors_bytes >= past + use.neighbors_unread_bytes, "the neighbours read count too"
    assert all(f.cache.has(i) for i in range(own[0], own[0] + 1 + len(ahead)))


def blob_file(blob: bytes, index: EStargzIndex, e) -> bytes:
    """A file's bytes decoded from its chunks (what the span manager must return)."""
    out = b""
    for i in index.spans_for(e.offset, e.offset + e.size):
        c0, c1 = index.span_compressed_range(i)
        u0, _ = index.span_uncompressed_range(i)
        data = index.decompress_span(i, blob[c0:c1])
        out += data[max(e.offset - u0, 0):e.offset + e.size - u0]
    return out


def test_a_recording_fetcher_keeps_read_ranges_joined_in_order(small_files_esgz, tmp_path, monkeypatch):
    # what `soci optimize` lays a layer's spans out by: a file read in order is one range, the
    # order of first reads is kept, and past the cap nothing (the spans stay recorded)
    from lazyoci.fs import span_fetcher
    from lazyoci.fs.span_cache import SpanCache
    from lazyoci.fs.span_fetcher import SpanFetcher

    index, blob = small_files_esgz
    spans = [index.span_uncompressed_range(i) for i in range(index.num_spans)]
    cache = SpanCache(tmp_path / "cache").layer("sha256:" + "4" * 64, index.digest, spans)
    f = SpanFetcher(index, lambda a, b: blob[a:b], cache, "sha256:" + "4" * 64)
    f.ranges = []
    files = {e.name: e for e in (index.entry(i) for i in range(len(index))) if e.type == "reg"}
    a, b = files["pkg/m050.py"], files["pkg/m003.py"]
    f.read(a.offset, a.offset + 1000, read_ahead=False)
    f.read(a.offset + 1000, a.offset + a.size, read_ahead=False)
    f.read(b.offset, b.offset + b.size, read_ahead=False)
    assert f.read_ranges() == [(a.offset, a.offset + a.size), (b.offset, b.offset + b.size)]
    monkeypatch.setattr(span_fetcher, "MAX_RECORDED_RANGES", 2)
    c = files["pkg/m090.py"]
    f.read(c.offset, c.offset + c.size, read_ahead=False)
    assert f.read_ranges() == [] and f.read_order()

