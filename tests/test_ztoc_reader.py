"""zTOC reading: flatc decodes what we write, v1 checkpoint blobs, byte ranges of files."""

from __future__ import annotations

import gzip
import io
import json
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

import lazyoci.ztoc
from lazyoci.ztoc import Ztoc, build_ztoc, decompress_span, read_range, verify_span
from lazyoci.ztoc.codec import GZIP, encode_ztoc
from lazyoci.ztoc.toc import TocBuilder
from lazyoci.ztoc.zinfo import CHECKPOINT_SIZE, HEADER, GzipIndexer, encode_checkpoints
from helpers.ztoc_layers import SMALL_SPAN, all_types_tar, archive_end, members

SCHEMA = Path(lazyoci.ztoc.__file__).parent / "schema.fbs"


@pytest.fixture(scope="module")
def layer() -> tuple[bytes, bytes, bytes]:
    raw = all_types_tar()
    blob = gzip.compress(raw, 6, mtime=0)
    return raw, blob, build_ztoc(io.BytesIO(blob), "gzip", SMALL_SPAN, build_tool="lazyoci test")


def test_flatc_decodes_the_ztoc(layer, tmp_path: Path) -> None:
    raw, blob, data = layer
    (tmp_path / "ztoc.bin").write_bytes(data)
    subprocess.run(["flatc", "--json", "--raw-binary", "--strict-json", "-o", str(tmp_path), str(SCHEMA),
                    "--", str(tmp_path / "ztoc.bin")], check=True, capture_output=True)
    doc = json.loads((tmp_path / "ztoc.json").read_text())
    z = Ztoc.parse(data)
    assert doc["version"] == "0.9"
    assert doc["build_tool_identifier"] == "lazyoci test" == z.build_tool
    assert doc["compressed_archive_size"] == len(blob)
    assert doc["uncompressed_archive_size"] == archive_end(raw)    # the reference's: where Go's reader stops
    ci = doc["compression_info"]
    assert ci.get("compression_algorithm", "Gzip") == "Gzip"
    assert ci["max_span_id"] == z.num_spans - 1
    assert ci["span_digests"] == [z.span_digest(i) for i in range(z.num_spans)]
    cp = bytes(ci["checkpoints"])
    n, span = HEADER.unpack_from(cp)
    assert (n, span) == (z.num_spans, SMALL_SPAN) and len(cp) == HEADER.size + n * CHECKPOINT_SIZE
    metadata = doc["toc"]["metadata"]
    ms = members(raw)
    assert len(metadata) == len(ms)
    for fm, m in zip(metadata, ms):
        assert fm["name"].rstrip("/") == m.name
        assert fm.get("uncompressed_offset", 0) == m.offset_data
        assert fm.get("uncompressed_size", 0) == m.size
        assert fm.get("mode", 0) == m.mode and fm.get("uid", 0) == m.uid
        keys = [x["key"] for x in fm.get("xattrs", [])]
        assert keys == sorted(m.pax_headers)
    by_name = {fm["name"]: fm for fm in metadata}
    assert by_name["dev/null"]["type"] == "char" and by_name["dev/null"]["devminor"] == 3
    assert by_name["fractional-mtime"]["mod_time"] == "2023-11-14T22:13:20.123456789Z"


def test_flatc_decodes_uncompressed_layer_ztoc(tmp_path: Path) -> None:
    raw = all_types_tar()
    data = build_ztoc(io.BytesIO(raw), "none", SMALL_SPAN)
    (tmp_path / "z.bin").write_bytes(data)
    subprocess.run(["flatc", "--json", "--raw-binary", "--strict-json", "-o", str(tmp_path), str(SCHEMA),
                    "--", str(tmp_path / "z.bin")], check=True, capture_output=True)
    ci = json.loads((tmp_path / "z.json").read_text())["compression_info"]
    assert ci["compression_algorithm"] == "Uncompressed"
    assert ci["max_span_id"] == -(-len(raw) // SMALL_SPAN) - 1
    (tmp_path / "tz.bin").write_bytes(bytes(ci["checkpoints"]))
    subprocess.run(["flatc", "--json", "--raw-binary", "--strict-json", "-o", str(tmp_path),
                    str(SCHEMA.parent / "zinfo.fbs"), "--", str(tmp_path / "tz.bin")], check=True, capture_output=True)
    assert json.loads((tmp_path / "tz.json").read_text()) == {"version": 2, "span_size": SMALL_SPAN, "size": len(raw)}


def test_v1_checkpoint_blob_is_read(layer) -> None:
    """A v1 blob lacks checkpoint 0; the reader rebuilds it as in=10, out=0, zero window."""
    raw, blob, _ = layer
    toc = TocBuilder()
    idx = GzipIndexer(SMALL_SPAN, toc.feed)
    idx.feed(blob)
    idx.finish()
    v2 = encode_checkpoints(SMALL_SPAN, idx.points)
    v1 = HEADER.pack(len(idx.points), SMALL_SPAN) + v2[HEADER.size + CHECKPOINT_SIZE:]
    data = encode_ztoc(build_tool="AWS SOCI CLI v0.2", compressed_size=len(blob), uncompressed_size=len(raw),
                       entries=toc.finish(), algorithm=GZIP, span_digests=idx.digests, checkpoints=v1)
    z = Ztoc.parse(data)
    assert z.checkpoints.version == 1 and z.num_spans == len(idx.points)
    assert (z.checkpoints.ins[0], z.checkpoints.outs[0]) == (10, 0)
    assert bytes(z.checkpoints.window(0)) == bytes(32768)
    for i in range(z.num_spans):
        cs, ce = z.span_compressed_range(i)
        us, ue = z.span_uncompressed_range(i)
        verify_span(z, i, blob[cs:ce])
        assert decompress_span(z, i, blob[cs:ce]) == raw[us:ue]


class CountingFetch:
    def __init__(self, blob: bytes) -> None:
        self.blob, self.calls, self.bytes = blob, 0, 0

    def __call__(self, start: int, end: int) -> bytes:
        self.calls += 1
        self.bytes += end - start
        return self.blob[start:end]


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_read_range_of_files_matches_tarfile(layer, compression: str) -> None:
    raw = layer[0]
    blob = layer[1] if compression == "gzip" else raw
    z = Ztoc.parse(layer[2] if compression == "gzip" else build_ztoc(io.BytesIO(raw), "none", SMALL_SPAN))
    tf = tarfile.open(fileobj=io.BytesIO(raw))
    rnd = random.Random(7)
    for i in range(len(z)):
        e = z.entry(i)
        if e.type != "reg":
            continue
        content = tf.extractfile(e.name).read()
        fetch = CountingFetch(blob)
        assert read_range(z, fetch, e.offset, e.offset + e.size) == content
        for _ in range(5):
            a = rnd.randint(0, e.size)
            b = rnd.randint(a, e.size)
            fetch = CountingFetch(blob)
            assert read_range(z, fetch, e.offset + a, e.offset + b) == content[a:b], (e.name, a, b)
            spans = z.spans_for(e.offset + a, e.offset + b)
            assert fetch.calls == (1 if spans else 0)
            if spans:   # only the spans that hold the bytes were fetched
                assert fetch.bytes == (z.span_compressed_range(spans[-1])[1] - z.span_compressed_range(spans[0])[0])
                assert fetch.bytes < len(blob) or len(spans) == z.num_spans


def test_read_range_rejects_tampered_span(layer) -> None:
    from lazyoci.errors import IntegrityError
    raw, blob, data = layer
    z = Ztoc.parse(data)
    bad = bytearray(blob)
    cs, ce = z.span_compressed_range(3)
    bad[(cs + ce) // 2] ^= 0xFF
    us, ue = z.span_uncompressed_range(3)
    with pytest.raises(IntegrityError, match="span 3 digest mismatch"):
        read_range(z, CountingFetch(bytes(bad)), us, ue)


def test_inflate_span_fills_a_bytes_object_of_its_own(layer) -> None:
    """inflate_span writes into a new bytes object it allocates unfilled: every length, the
    1-byte one included, gives the stream's bytes, and no two calls share an object."""
    from lazyoci.ztoc.zinfo import inflate_span
    raw, blob, data = layer
    z = Ztoc.parse(data)
    assert z.checkpoints is not None
    for i in range(z.num_spans):
        cs, ce = z.span_compressed_range(i)
        us, ue = z.span_uncompressed_range(i)
        for length in {1, 2, 4097, ue - us}:
            if length > ue - us:
                continue
            a = inflate_span(z.checkpoints, i, blob[cs:ce], length)
            b = inflate_span(z.checkpoints, i, blob[cs:ce], length)
            assert type(a) is bytes and a == raw[us:us + length] and a == b
            assert a is not b or length == 1      # CPython may share 1-byte objects, never longer


def test_ztoc_holds_no_object_per_entry(layer) -> None:
    """The view keeps the bytes and compact arrays only: size ~ len(data)."""
    z = Ztoc.parse(layer[2])
    assert not any(isinstance(v, list) and len(v) >= len(z) for v in vars(z).values())
    assert z.entry(0) == z.entry(0) and z.entry(0) is not z.entry(0)


def test_ztoc_written_by_another_flatbuffers_writer(layer, tmp_path: Path) -> None:
    """flatc re-encodes our JSON with its own builder (back to front, defaults omitted, shared
    vtables): the reader must see the same zTOC, as it will with the reference's Go builder."""
    raw, blob, data = layer
    (tmp_path / "ztoc.bin").write_bytes(data)
    subprocess.run(["flatc", "--json", "--raw-binary", "--strict-json", "-o", str(tmp_path), str(SCHEMA),
                    "--", str(tmp_path / "ztoc.bin")], check=True, capture_output=True)
    out = tmp_path / "again"
    subprocess.run(["flatc", "--binary", "-o", str(out), str(SCHEMA), str(tmp_path / "ztoc.json")],
                   check=True, capture_output=True)
    other = (out / "ztoc.bin").read_bytes()
    assert other != data
    a, b = Ztoc.parse(data), Ztoc.parse(other)
    assert (a.version, a.build_tool, a.compressed_size, a.uncompressed_size, a.num_spans, a.span_size) == \
           (b.version, b.build_tool, b.compressed_size, b.uncompressed_size, b.num_spans, b.span_size)
    assert [a.entry(i) for i in range(len(a))] == [b.entry(i) for i in range(len(b))]
    for i in range(b.num_spans):
        assert b.span_digest(i) == a.span_digest(i)
        cs, ce = b.span_compressed_range(i)
        us, ue = b.span_uncompressed_range(i)
        assert decompress_span(b, i, blob[cs:ce]) == raw[us:ue]


def test_packed_tar_zinfo_of_older_reference_releases() -> None:
    """Some reference releases packed TarZinfo as int32 version, int64 span, int64 size."""
    import struct
    from lazyoci.ztoc.codec import UNCOMPRESSED
    raw = all_types_tar()
    toc = TocBuilder()
    toc.feed(raw)
    import hashlib
    digests = ["sha256:" + hashlib.sha256(raw[i:i + SMALL_SPAN]).hexdigest() for i in range(0, len(raw), SMALL_SPAN)]
    data = encode_ztoc(build_tool="AWS SOCI CLI v0.2", compressed_size=len(raw), uncompressed_size=len(raw),
                       entries=toc.finish(), algorithm=UNCOMPRESSED, span_digests=digests,
                       checkpoints=struct.pack("<iqq", 2, SMALL_SPAN, len(raw)))
    z = Ztoc.parse(data)
    assert z.compression == "none" and z.span_size == SMALL_SPAN and z.num_spans == len(digests)
    e = next(z.entry(i) for i in range(len(z)) if z.entry(i).name == "bin/big-text")
    assert read_range(z, lambda a, b: raw[a:b], e.offset, e.offset + e.size) == raw[e.offset:e.offset + e.size]


def test_spans_for_boundaries(layer) -> None:
    z = Ztoc.parse(layer[2])
    n, usize = z.num_spans, z.uncompressed_size
    assert z.spans_for(0, usize) == range(n)
    assert not z.spans_for(5, 5) and not z.spans_for(usize, usize + 10) and not z.spans_for(10, 3)
    for i in range(n):
        us, ue = z.span_uncompressed_range(i)
        assert z.spans_for(us, ue) == range(i, i + 1)
        assert z.spans_for(ue - 1, ue + 1) == (range(i, i + 2) if i + 1 < n else range(i, i + 1))


def test_rfc3339_times_sharing_their_seconds_parse_alike() -> None:
    """The seconds of a time are memoised by their text (a layer's files share a few): the same
    second with another fraction, zone or a time that is no date must each parse on their own."""
    import datetime as dt
    from lazyoci.errors import FormatError
    from lazyoci.ztoc.toc import format_rfc3339_nano, parse_rfc3339_nano

    rng = random.Random(7)
    for _ in range(2000):
        ns = rng.randrange(-10**18, 4 * 10**18)
        assert parse_rfc3339_nano(format_rfc3339_nano(ns)) == ns
    base = "2026-12-06T11:02:51"
    assert parse_rfc3339_nano(base + "Z") == 1_796_554_971 * 10**9
    assert parse_rfc3339_nano(base + ".5Z") == 1_796_554_971 * 10**9 + 500_000_000
    assert parse_rfc3339_nano(base + ".000000001Z") == 1_796_554_971 * 10**9 + 1
    assert parse_rfc3339_nano(base + ".5+02:00") == (1_796_554_971 - 7200) * 10**9 + 500_000_000
    assert parse_rfc3339_nano(base + "-01:30") == (1_796_554_971 + 5400) * 10**9
    local = dt.datetime(2026, 12, 6, 11, 2, 51, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert parse_rfc3339_nano(base + "+02:00") == int(local.timestamp()) * 10**9
    for bad in ("2026-02-30T11:02:51Z", "2026-02-30T11:02:51.1Z", base, base + ".Z", base + ".1234567890Z"):
        with pytest.raises(FormatError):
            parse_rfc3339_nano(bad)
