"""zTOC building: TOC entries against Python's tarfile, checkpoints against the real tar stream."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import pytest

from lazyoci.ztoc import Ztoc, build_ztoc, decompress_span, read_range, verify_span
from helpers.hostile_ztoc import ztoc_parts
from helpers.ztoc_layers import SMALL_SPAN, TYPES, all_types_tar, archive_end, gzip_members, members, pigz, text


def check_toc(z: Ztoc, raw: bytes) -> None:
    """Every TOC entry agrees with tarfile on the same stream (offset_data, size and metadata)."""
    ms = members(raw)
    assert len(z) == len(ms)
    for i, m in enumerate(ms):
        e = z.entry(i)
        assert e.name.rstrip("/") == m.name, i
        assert (e.offset, e.size) == (m.offset_data, m.size), m.name
        assert e.type == TYPES[m.type], m.name
        assert (e.mode, e.uid, e.gid, e.uname, e.gname) == (m.mode, m.uid, m.gid, m.uname, m.gname), m.name
        assert e.linkname == m.linkname, m.name
        assert (e.devmajor, e.devminor) == (m.devmajor, m.devminor), m.name
        assert abs(e.mtime_ns / 1e9 - m.mtime) < 1e-6, m.name
        assert e.pax == m.pax_headers, m.name
        if e.type == "reg":
            assert raw[e.offset:e.offset + e.size] == tarfile.open(fileobj=io.BytesIO(raw)).extractfile(m).read()


def check_spans(z: Ztoc, blob: bytes, raw: bytes) -> None:
    """Each span inflates to exactly its bytes of the tar stream up to the archive's end (the
    reference's uncompressed archive size); digests match; no gaps anywhere."""
    assert z.compressed_size == len(blob) and z.uncompressed_size == archive_end(raw)
    raw = raw[:z.uncompressed_size]
    prev_c_end = prev_u_end = None
    for i in range(z.num_spans):
        cs, ce = z.span_compressed_range(i)
        us, ue = z.span_uncompressed_range(i)
        piece = blob[cs:ce]
        assert z.span_digest(i) == "sha256:" + hashlib.sha256(piece).hexdigest()
        verify_span(z, i, piece)
        assert decompress_span(z, i, piece) == raw[us:ue], f"span {i}"
        if i == 0:
            assert us == 0
        else:
            assert us == prev_u_end
            # a span that starts mid-byte shares that byte with the one before it
            assert cs in (prev_c_end, prev_c_end - 1)
        prev_c_end, prev_u_end = ce, ue
    assert prev_c_end == len(blob) and prev_u_end == len(raw)


def build(blob: bytes, compression: str = "gzip", span: int = SMALL_SPAN) -> Ztoc:
    return Ztoc.parse(build_ztoc(io.BytesIO(blob), compression, span))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_toc_matches_tarfile_for_every_entry_type(fmt: int) -> None:
    if fmt == tarfile.USTAR_FORMAT:   # ustar cannot hold the long names and PAX records
        from helpers.images import Entry, tar_bytes
        raw = tar_bytes([Entry("a", "dir"), Entry("a/b", data=text(5000, 9)), Entry("a/l", "symlink", linkname="b"),
                         Entry(("p" * 90) + "/" + ("n" * 90), data=b"prefix field")], format=fmt)
    else:
        raw = all_types_tar(fmt)
    blob = gzip.compress(raw, 6, mtime=0)
    z = build(blob)
    check_toc(z, raw)
    check_spans(z, blob, raw)
    assert z.compression == "gzip" and z.span_size == SMALL_SPAN and z.version == "0.9"
    if fmt == tarfile.USTAR_FORMAT:
        return
    assert z.num_spans > 10
    assert any(z.checkpoints.bits[i] for i in range(z.num_spans)), "no mid-byte checkpoint exercised"


def test_pax_records_xattrs_and_nanosecond_mtime() -> None:
    z = build(gzip.compress(all_types_tar(), mtime=0))
    by_name = {z.entry(i).name: z.entry(i) for i in range(len(z))}
    x = by_name["xattr-file"]
    assert x.xattrs == {"user.comment": b"hello", "security.capability": b"cap"}
    assert x.pax["LAZYOCI.custom"] == "value"
    f = by_name["fractional-mtime"]
    assert f.mod_time == "2023-11-14T22:13:20.123456789Z"
    assert f.mtime_ns == 1_700_000_000_123_456_789
    assert by_name["etc/hostname"].mod_time == "2023-11-14T22:13:20Z"
    assert by_name["dev/null"].type == "char" and by_name["dev/null"].devminor == 3
    long_file = [e for e in by_name.values() if e.name.endswith("f" * 150)]
    assert len(long_file) == 1 and len(long_file[0].name) > 250


def test_global_pax_header_applies_to_no_entry() -> None:
    """containerd's rule (docs/TAR.md): the entries keep only their own records."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global", "LAZYOCI.g": "1"}) as tf:
        for name, local in (("one", {}), ("two", {"LAZYOCI.g": "2"})):
            ti = tarfile.TarInfo(name)
            ti.size, ti.pax_headers = 3, local
            tf.addfile(ti, io.BytesIO(b"abc"))
    raw = buf.getvalue()
    z = build(gzip.compress(raw, mtime=0))
    ms = members(raw)
    assert [(z.entry(i).offset, z.entry(i).size) for i in range(len(z))] == [(m.offset_data, m.size) for m in ms]
    assert z.entry(0).pax == {}
    assert z.entry(1).pax == {"LAZYOCI.g": "2"}


@pytest.mark.parametrize("maker", ["pigz", "pigz-independent", "members"])
def test_multi_member_and_pigz_layers(maker: str) -> None:
    raw = all_types_tar()
    if maker == "members":   # checkpoints land inside and at the start of later members
        blob = gzip_members(raw, [1000, 200_000, 200_512, 900_000])
    else:
        blob = pigz(raw, *(["-i"] if maker == "pigz-independent" else []))
    assert gzip.decompress(blob) == raw
    z = build(blob, span=32 << 10)
    check_toc(z, raw)
    check_spans(z, blob, raw)


def test_uncompressed_tar_layer() -> None:
    raw = all_types_tar()
    z = build(raw, "none")
    assert z.compression == "none" and z.num_spans == -(-len(raw) // SMALL_SPAN)
    check_toc(z, raw)
    check_spans(z, raw, raw)
    # max_span_id when the size is an exact multiple of the span size
    exact = build(raw, "none", span=len(raw) // 4) if len(raw) % 4 == 0 else None
    if exact is not None:
        assert exact.num_spans == 4


def test_default_span_size_and_checkpoint_zero() -> None:
    raw = all_types_tar()
    blob = gzip.compress(raw, mtime=0)
    z = build(blob, span=1 << 22)
    assert z.span_size == 1 << 22 and z.num_spans == 1
    assert (z.checkpoints.ins[0], z.checkpoints.outs[0], z.checkpoints.bits[0]) == (10, 0, 0)
    assert z.span_compressed_range(0) == (10, len(blob))
    check_spans(z, blob, raw)


def test_gnu_base256_numbers_and_v7_headers() -> None:
    from helpers.images import Entry, tar_bytes
    big = tar_bytes([Entry("big-ids", data=b"x" * 700, uid=3_000_000_000, gid=2_500_000_000,
                           mtime=-1_000_000_000)], format=tarfile.GNU_FORMAT)
    z = build(gzip.compress(big, mtime=0))
    check_toc(z, big)
    e = z.entry(0)
    assert (e.uid, e.gid, e.mtime_ns) == (3_000_000_000, 2_500_000_000, -1_000_000_000_000_000_000)
    assert e.mod_time == "1938-04-24T22:13:20Z"
    # v7: no magic, a directory marked only by its trailing slash
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, kind, data in (("olddir/", tarfile.AREGTYPE, b""), ("olddir/f", tarfile.AREGTYPE, b"v7 data")):
            ti = tarfile.TarInfo(name)
            ti.type, ti.size = kind, len(data)
            tf.addfile(ti, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    for hdr in (0, 512):
        raw[hdr + 257:hdr + 265] = bytes(8)
        raw[hdr + 148:hdr + 156] = b"        "
        raw[hdr + 148:hdr + 156] = b"%06o\0 " % sum(raw[hdr:hdr + 512])
    z = build(bytes(raw), "none")
    assert [(z.entry(i).name, z.entry(i).type) for i in range(len(z))] == [("olddir/", "dir"), ("olddir/f", "reg")]
    assert z.entry(1).offset == 1024 and z.entry(1).size == 7


def test_chunking_does_not_matter() -> None:
    """The builder gives identical bytes whatever sizes the reads come in."""
    class Dribble(io.BytesIO):
        def __init__(self, data: bytes, sizes: list[int]) -> None:
            super().__init__(data)
            self.sizes = sizes

        def read(self, n: int = -1) -> bytes:
            return super().read(self.sizes[self.tell() % len(self.sizes)])

    raw = all_types_tar()
    blob = gzip.compress(raw, mtime=0)
    want = build_ztoc(io.BytesIO(blob), "gzip", SMALL_SPAN)
    assert build_ztoc(Dribble(blob, [1, 7, 512, 3000, 1 << 20, 13]), "gzip", SMALL_SPAN) == want
    want_tar = build_ztoc(io.BytesIO(raw), "none", SMALL_SPAN)
    assert build_ztoc(Dribble(raw, [511, 1, 1024, 99999]), "none", SMALL_SPAN) == want_tar


@pytest.mark.parametrize("maker", ["gzip", "members"])
def test_inflate_backends_agree(monkeypatch, maker: str) -> None:
    """zlib-ng (default) and the system zlib stop at the same block ends: identical zTOCs."""
    from lazyoci.ztoc import libz
    raw = all_types_tar()
    blob = gzip.compress(raw, mtime=0) if maker == "gzip" else gzip_members(raw, [4096, 500_000])
    built = {}
    for name in ("zlib", "zlib-ng"):
        monkeypatch.setattr(libz, "BACKEND", libz.load_backend(name))
        built[name] = build_ztoc(io.BytesIO(blob), "gzip", SMALL_SPAN)
        check_spans(Ztoc.parse(built[name]), blob, raw)
    assert built["zlib"] == built["zlib-ng"]


@pytest.mark.parametrize("maker", ["gzip", "members", "pigz-independent"])
def test_skipping_block_ends_changes_nothing(monkeypatch, maker: str) -> None:
    """Inflating without Z_BLOCK until a checkpoint is due gives the checkpoints of Z_BLOCK everywhere."""
    from lazyoci.ztoc import zinfo
    raw = all_types_tar()
    blob = {"gzip": lambda: gzip.compress(raw, mtime=0),
            "members": lambda: gzip_members(raw, [700, 65536, 300_001]),
            "pigz-independent": lambda: pigz(raw, "-i")}[maker]()
    built = {}
    for skip in (True, False):
        monkeypatch.setattr(zinfo, "SKIP_UNNEEDED_BLOCK_ENDS", skip)
        for span in (SMALL_SPAN, 20_000, 512):
            built[skip, span] = build_ztoc(io.BytesIO(blob), "gzip", span)
    for span in (SMALL_SPAN, 20_000, 512):
        assert built[True, span] == built[False, span], span
    check_spans(Ztoc.parse(built[True, 20_000]), blob, raw)


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_uncompressed_archive_size_stops_after_the_end_blocks_and_older_ztocs_still_read(compression: str) -> None:
    """The reference records where Go's tar reader stops (after the two zero blocks), not the whole
    inflated stream: zero padding after them (here three spans of it) is in the spans, not the
    archive. lazyoci's older zTOCs, which counted the padding, read the same bytes."""
    raw = all_types_tar() + bytes(3 * SMALL_SPAN)
    blob = gzip.compress(raw, mtime=0) if compression == "gzip" else raw
    z = build(blob, compression)
    assert z.uncompressed_size == archive_end(raw) < len(raw)
    assert z.span_compressed_range(z.num_spans - 1)[1] == len(blob)
    check_toc(z, raw)
    assert read_range(z, lambda a, b: blob[a:b], 0, len(raw)) == raw[:z.uncompressed_size]
    if compression == "gzip":
        parts = ztoc_parts(blob, SMALL_SPAN)
        older = Ztoc.parse(parts.encode())
        assert parts.usize == older.uncompressed_size == len(raw)
        assert [older.entry(i) for i in range(len(older))] == [z.entry(i) for i in range(len(z))]
        assert read_range(older, lambda a, b: blob[a:b], 0, len(raw)) == raw
