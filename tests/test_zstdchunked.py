"""zstd:chunked TOCs as a lazy layer index: layers made by skopeo (containers/storage's compressor),
read by lazyoci/zstdchunked, compared with the tar each layer holds; and every bad input refused."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import zstandard

from helpers.images import Entry, image_config, make_layer, write_oci_layout
from helpers.tricky_image import BUSYBOX, build_tricky_image
from helpers.zstd_chunked import blob, chunked_layout, layout_manifest
from lazyoci.errors import FormatError, IntegrityError, LazyociError
from lazyoci.fs.layer_index import LayerIndex
from lazyoci.fs.tree import LayerTree
from lazyoci.oci.manifest import Descriptor
from lazyoci.zstdchunked import ZstdChunkedToc, is_chunked_layer, is_chunked_toc, toc_location
from lazyoci.zstdchunked.toc import MAX_TOC_BYTES, decode_toc

OLD = "io.containers.zstd-chunked."
NEW = "io.github.containers.zstd-chunked."


class ChunkedLayer:
    """One zstd:chunked layer of a skopeo-made layout: its blob, annotations and TOC."""

    def __init__(self, layout: Path, desc: dict) -> None:
        self.desc = Descriptor.from_json(desc)
        self.blob = blob(layout, desc["digest"])
        self.loc = toc_location(self.desc.annotations, len(self.blob))
        assert self.loc is not None
        self.toc_bytes = self.blob[self.loc.offset:self.loc.offset + self.loc.length]

    def parse(self) -> ZstdChunkedToc:
        loc = self.loc
        return ZstdChunkedToc.parse(self.toc_bytes, loc.checksum, loc.data_end, loc.uncompressed_length)

    def toc_json(self) -> dict:
        return json.loads(decode_toc(self.toc_bytes))

    def tar(self) -> bytes:
        """The layer's tar stream: the blob's frames decoded (the skippable TOC frames are skipped)."""
        reader = zstandard.ZstdDecompressor().stream_reader(self.blob, read_across_frames=True)
        return reader.read()


@pytest.fixture(scope="module")
def tricky_chunked(tmp_path_factory) -> list[ChunkedLayer]:
    work = tmp_path_factory.mktemp("chunked")
    img = build_tricky_image(work)
    out = chunked_layout(img.layout, work / "chunked")
    return [ChunkedLayer(out, d) for d in layout_manifest(out)["layers"]]


def _content(index: ZstdChunkedToc, layer_blob: bytes) -> bytes:
    out = bytearray()
    for i in range(index.num_spans):
        c0, c1 = index.span_compressed_range(i)
        u0, u1 = index.span_uncompressed_range(i)
        assert u0 == len(out)
        index.verify_span(i, layer_blob[c0:c1])
        out += index.decompress_span(i, layer_blob[c0:c1])
    return bytes(out)


def test_skopeo_writes_the_annotations_lazyoci_reads(tricky_chunked):
    for layer in tricky_chunked:
        assert layer.desc.media_type.endswith("tar+zstd")
        assert is_chunked_layer(layer.desc)
        assert layer.loc.checksum == "sha256:" + hashlib.sha256(layer.toc_bytes).hexdigest()
        assert is_chunked_toc(layer.toc_bytes)


def test_entries_and_content_are_those_of_the_tar(tricky_chunked):
    """Every entry of each layer's tar, with its attributes, xattrs and content, is in the index."""
    for layer in tricky_chunked:
        index = layer.parse()
        assert isinstance(index, LayerIndex)
        content = _content(index, layer.blob)
        assert len(content) == index.uncompressed_size
        members = tarfile.open(fileobj=io.BytesIO(layer.tar())).getmembers()
        assert len(members) == len(index)
        kinds = {tarfile.REGTYPE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
                 tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
                 tarfile.FIFOTYPE: "fifo"}
        tf = tarfile.open(fileobj=io.BytesIO(layer.tar()))
        for i, m in enumerate(members):
            e = index.entry(i)
            assert (e.name, e.type, e.mode, e.uid, e.gid) == (m.name + ("/" if m.isdir() else ""),
                                                            kinds[m.type], m.mode, m.uid, m.gid)
            assert e.mtime_ns // 10**9 == int(m.mtime)
            if m.issym() or m.islnk():
                assert e.linkname == m.linkname
            if m.ischr() or m.isblk():
                assert (e.devmajor, e.devminor) == (m.devmajor, m.devminor)
            want_x = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                      for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            assert e.xattrs == want_x, e.name
            if m.isreg():
                data = tf.extractfile(m).read()
                assert e.size == len(data) and content[e.offset:e.offset + e.size] == data, e.name
                if data:
                    assert e.digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert [n for n, _, _ in index.tree_entries()] == [index.entry_name(i) for i in range(len(index))]


def test_spans_for_finds_the_chunks_of_a_range(tricky_chunked):
    index = tricky_chunked[0].parse()
    assert index.num_spans > 10                 # busybox is cut into many chunks
    for i in range(index.num_spans):
        u0, u1 = index.span_uncompressed_range(i)
        assert list(index.spans_for(u0, u1)) == [i]
        assert list(index.spans_for(u1 - 1, u1 + 1))[0] == i
    assert list(index.spans_for(0, index.uncompressed_size)) == list(range(index.num_spans))
    assert list(index.spans_for(index.uncompressed_size, index.uncompressed_size + 5)) == []


def test_the_tree_of_a_layer_has_its_whiteouts_and_hardlinks(tricky_chunked):
    from lazyoci.fs.tree import HARDLINK, WHITEOUT

    trees = [LayerTree(layer.parse()) for layer in tricky_chunked]
    kinds = [set(t.kind) for t in trees]
    assert WHITEOUT in kinds[1] and HARDLINK in kinds[0]
    assert trees[1].opaque                      # layer 2 makes a directory opaque


def test_one_altered_byte_in_a_chunk_is_an_integrity_error(tricky_chunked):
    layer = tricky_chunked[0]
    index = layer.parse()
    i = max(range(index.num_spans), key=lambda k: index.span_compressed_range(k)[1] - index.span_compressed_range(k)[0])
    c0, c1 = index.span_compressed_range(i)
    for at in (c0 + 20, (c0 + c1) // 2, c1 - 5):
        bad = bytearray(layer.blob[c0:c1])
        bad[at - c0] ^= 0x01
        with pytest.raises(IntegrityError):
            index.decompress_span(i, bytes(bad))
    with pytest.raises(IntegrityError):
        index.verify_span(i, layer.blob[c0:c1 - 1])
    assert index.span_digest(i).startswith("sha256:")


def test_both_annotation_prefixes_are_read():
    old = {OLD + "manifest-checksum": "sha256:" + "a" * 64, OLD + "manifest-position": "100:50:200:1"}
    new = {k.replace(OLD, NEW): v for k, v in old.items()}
    assert toc_location(old, 1000) == toc_location(new, 1000)
    assert toc_location(old, 1000).data_end == 92
    assert toc_location({"other": "x"}, 1000) is None
    assert not is_chunked_layer(Descriptor("application/vnd.oci.image.layer.v1.tar+zstd", "sha256:" + "b" * 64, 5))
    assert not is_chunked_layer(Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", "sha256:" + "b" * 64,
                                           5, annotations=old))


@pytest.mark.parametrize("annotations, why", [
    ({OLD + "manifest-checksum": "sha256:" + "a" * 64}, "missing"),
    ({OLD + "manifest-checksum": "sha256:" + "a" * 64, OLD + "manifest-position": "1:2:3"}, "offset:length"),
    ({OLD + "manifest-checksum": "sha256:" + "a" * 64, OLD + "manifest-position": "100:5\u00b2:200:1"}, "offset:length"),
    ({OLD + "manifest-checksum": "sha256:" + "a" * 64, OLD + "manifest-position": "9" * 5000 + ":50:200:1"},
     "offset:length"),
    ({OLD + "manifest-checksum": "sha256:" + "a" * 64, OLD + "manifest-position": "100:50:200:2"}, "type 2"),
    ({OLD + "manifest-checksum": "sha256:" + "a" * 64, OLD + "manifest-position": "990:50:200:1"}, "outside"),
    ({OLD + "manifest-checksum": "sha512:" + "a" * 128, OLD + "manifest-position": "100:50:200:1"}, "sha256"),
    ({OLD + "manifest-checksum": "nope", OLD + "manifest-position": "100:50:200:1"}, "digest"),
])
def test_malformed_annotations_are_refused(annotations, why):
    with pytest.raises(FormatError, match=why):
        toc_location(annotations, 1000)


# -- hostile TOCs: each is a FormatError when parsed (the pull then downloads the layer whole) ------------

def _compress(doc: object) -> bytes:
    return zstandard.ZstdCompressor().compress(json.dumps(doc).encode())


def _file(name: str, offset: int, end: int, size: int, **more: object) -> dict:
    return {"type": "reg", "name": name, "size": size, "offset": offset, "endOffset": end,
            "digest": "sha256:" + "c" * 64, **more}


GOOD = [{"type": "dir", "name": "a/"}, _file("a/one", 100, 200, 10), _file("a/two", 300, 400, 10)]


@pytest.mark.parametrize("entries, why", [
    ([_file("a/one", 100, 200, 10), _file("a/two", 150, 400, 10)], "overlaps"),
    ([_file("a/one", 100, 200, 10), _file("a/two", 50, 90, 10)], "overlaps"),
    ([_file("a/one", 100, 2000, 10)], "past the file frames"),
    ([_file("a/one", 100, 100, 10)], "empty"),
    ([{"type": "reg", "name": "../etc/passwd"}], "leaves the layer"),
    ([{"type": "dir", "name": "/etc/"}], "leaves the layer"),
    ([{"type": "hardlink", "name": "x", "linkName": "a/../../y"}], "leaves the layer"),
    ([{"type": "reg", "name": "a\u0000b"}], "NUL"),
    ([{"type": "socket", "name": "s"}], "type"),
    ([{"type": "chunk", "name": "s", "offset": 5}], "without its file"),
    ([{"type": "dir", "name": "d", "size": 5}], "with content"),
    ([{"type": "reg", "name": "f", "size": 5, "offset": 10, "endOffset": 20}], "digest"),
    ([{"type": "reg", "name": "f", "mode": -1}], "mode"),
    ([{"type": "reg", "name": "f", "uid": "0"}], "uid"),
    ([{"type": "reg", "name": "f", "modtime": "yesterday"}], "mod_time"),
    ([{"type": "reg", "name": "f", "xattrs": {"user.a": "!!"}}], "base64"),
    ([_file("f", 100, 200, 30, chunkSize=10),
      {"type": "chunk", "name": "f", "offset": 150, "chunkOffset": 15, "chunkSize": 15}], "start at 10"),
    ([_file("f", 100, 200, 30, chunkSize=10),
      {"type": "chunk", "name": "f", "offset": 150, "chunkOffset": 10, "chunkSize": 10}], "cover 20 bytes of 30"),
    ([_file("f", 100, 200, 20, chunkSize=10, chunkDigest="sha256:" + "d" * 64),
      {"type": "chunk", "name": "g", "offset": 150, "chunkOffset": 10, "chunkSize": 10}], "another file"),
    ([_file("f", 100, 200, 20, chunkSize=10, chunkDigest="sha256:" + "d" * 64),
      {"type": "chunk", "name": "f", "offset": 90, "chunkOffset": 10, "chunkSize": 10,
       "chunkDigest": "sha256:" + "e" * 64}], "overlaps"),
    ([_file("f", 100, 200, (1 << 31))], "MAX_SPAN_BYTES"),
])
def test_a_hostile_toc_is_refused(entries, why):
    with pytest.raises(FormatError, match=why):
        ZstdChunkedToc.parse(_compress({"version": 1, "entries": entries}), data_end=1000)


def test_well_formed_hand_made_toc_parses():
    index = ZstdChunkedToc.parse(_compress({"version": 1, "entries": GOOD}), data_end=1000)
    assert (len(index), index.num_spans, index.uncompressed_size) == (3, 2, 20)
    assert index.span_compressed_range(1) == (300, 400)


@pytest.mark.parametrize("data, why", [
    (_compress({"version": 2, "entries": []}), "version"),
    (_compress([1, 2]), "object"),
    (_compress({"version": 1, "entries": {}}), "entry list"),
    (_compress({"version": 1, "entries": [5]}), "not an object"),
    (zstandard.ZstdCompressor().compress(b"{not json"), "not JSON"),
    (b"\x28\xb5\x2f\xfd" + b"\xff" * 20, "does not decode"),
])
def test_a_toc_that_is_not_a_toc_is_refused(data, why):
    with pytest.raises(FormatError, match=why):
        ZstdChunkedToc.parse(data)


def test_an_absurd_toc_size_is_refused_before_it_is_decoded(monkeypatch):
    from lazyoci.zstdchunked import toc as toc_module

    data = _compress({"version": 1, "entries": GOOD * 50})
    with pytest.raises(FormatError, match="MAX_TOC_BYTES"):      # as the annotation says: not decoded
        ZstdChunkedToc.parse(data, uncompressed_length=MAX_TOC_BYTES.value + 1)
    small = toc_module.Limit("MAX_TOC_BYTES", 1000, "bytes", "test")
    monkeypatch.setattr(toc_module, "MAX_TOC_BYTES", small)       # a bomb: decoding stops at the cap
    with pytest.raises(FormatError, match="MAX_TOC_BYTES"):
        ZstdChunkedToc.parse(zstandard.ZstdCompressor().compress(b" " * 100_000))
    with pytest.raises(FormatError, match="annotation says"):
        ZstdChunkedToc.parse(_compress({"version": 1, "entries": []}), uncompressed_length=7)


def test_a_small_layer_made_by_skopeo_round_trips(tmp_path):
    """A layer of one file, one empty file and a directory: the smallest shapes skopeo writes."""
    layer = make_layer([Entry("d/", "dir"), Entry("d/f", data=b"x" * 5000), Entry("d/empty")])
    src = tmp_path / "src"
    write_oci_layout(src, [layer], image_config([layer]))
    out = chunked_layout(src, tmp_path / "out")
    cl = ChunkedLayer(out, layout_manifest(out)["layers"][0])
    index = cl.parse()
    assert _content(index, cl.blob) == b"x" * 5000
    assert [index.entry(i).size for i in range(len(index))] == [0, 5000, 0]


def test_errors_are_lazyoci_errors():
    with pytest.raises(LazyociError):
        ZstdChunkedToc.parse(b"")


@pytest.mark.parametrize("entry", [{"type": ["reg"], "name": "x"}, {"type": "reg", "name": "\ud800"},
                                   {"type": "symlink", "name": "l", "linkName": "\udfff\ud800"},
                                   {"type": "reg", "name": "x", "xattrs": {"\ud800": ""}},
                                   {"type": "reg", "name": 5}])
def test_odd_json_values_are_refused(entry):
    with pytest.raises(FormatError):
        ZstdChunkedToc.parse(_compress({"version": 1, "entries": [entry]}))


def test_a_file_whose_chunks_lack_digests_is_one_span_checked_whole(tricky_chunked):
    """Chunks without their own digest cannot be checked alone: the file is fetched and checked
    against its whole digest (one span over all its frames)."""
    layer = tricky_chunked[0]
    doc = layer.toc_json()
    for e in doc["entries"]:
        if e["name"] == "bin/busybox":
            e.pop("chunkDigest", None)
    multi = ZstdChunkedToc.parse(layer.toc_bytes, data_end=layer.loc.data_end)
    whole = ZstdChunkedToc.parse(_compress(doc), data_end=layer.loc.data_end)
    assert whole.num_spans < multi.num_spans
    i = next(k for k in range(len(whole)) if whole.entry(k).name == "bin/busybox")
    e = whole.entry(i)
    (span,) = whole.spans_for(e.offset, e.offset + e.size)
    assert whole.span_uncompressed_range(span) == (e.offset, e.offset + e.size)
    assert whole.span_digest(span) == e.digest
    c0, c1 = whole.span_compressed_range(span)
    assert whole.decompress_span(span, layer.blob[c0:c1]) == BUSYBOX.read_bytes()
    assert _content(whole, layer.blob) == _content(multi, layer.blob)
