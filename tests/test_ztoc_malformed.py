"""Bad layers and hostile zTOCs fail with a clear FormatError / IntegrityError, never anything else."""

from __future__ import annotations

import gzip
import io
import random
import tarfile

import pytest

from lazyoci.errors import FormatError, IntegrityError
from lazyoci.ztoc import UnsupportedCompressionError, Ztoc, build_ztoc, decompress_span, verify_span
from lazyoci.ztoc import codec as C
from lazyoci.ztoc.codec import GZIP, encode_ztoc
from lazyoci.ztoc.toc import TocBuilder
from lazyoci.ztoc.zinfo import CHECKPOINT_SIZE, GzipIndexer, encode_checkpoints
from helpers.ztoc_layers import SMALL_SPAN, all_types_tar, noise, text
from helpers.images import Entry, tar_bytes


@pytest.fixture(scope="module")
def parts():
    """(raw, blob, entries, digests, checkpoint blob) of one gzip layer, to assemble hostile zTOCs from."""
    raw = all_types_tar()
    blob = gzip.compress(raw, 6, mtime=0)
    toc = TocBuilder()
    idx = GzipIndexer(SMALL_SPAN, toc.feed)
    idx.feed(blob)
    idx.finish()
    return raw, blob, toc.finish(), idx.digests, encode_checkpoints(SMALL_SPAN, idx.points)


def assemble(parts, **changes) -> bytes:
    raw, blob, entries, digests, cps = parts
    fields = dict(build_tool="t", compressed_size=len(blob), uncompressed_size=len(raw), entries=entries,
                  algorithm=GZIP, span_digests=digests, checkpoints=cps)
    fields.update(changes)
    return encode_ztoc(**fields)


def build(blob: bytes, compression: str = "gzip") -> bytes:
    return build_ztoc(io.BytesIO(blob), compression, SMALL_SPAN)


# -- bad layers ----------------------------------------------------------------------

def test_corrupt_gzip() -> None:
    blob = bytearray(gzip.compress(all_types_tar(), mtime=0))
    blob[len(blob) // 2:len(blob) // 2 + 64] = bytes(64)
    with pytest.raises(FormatError, match="corrupt deflate data|tar"):
        build(bytes(blob))


def test_bad_gzip_crc() -> None:
    blob = bytearray(gzip.compress(all_types_tar(), mtime=0))
    blob[-8] ^= 1
    with pytest.raises(FormatError, match="incorrect data check"):
        build(bytes(blob))


def test_truncated_blob() -> None:
    blob = gzip.compress(all_types_tar(), mtime=0)
    for cut in (5, 11, len(blob) // 3, len(blob) - 4):
        with pytest.raises(FormatError, match="truncated|corrupt|empty|no deflate"):
            build(blob[:cut])


def test_truncated_tar_inside_an_entry() -> None:
    raw = all_types_tar()
    with pytest.raises(FormatError, match="tar stream truncated"):
        build(gzip.compress(raw[:700_000], mtime=0))
    with pytest.raises(FormatError, match="tar stream truncated"):
        build(raw[:700_000], "none")


def test_non_tar_data() -> None:
    for data in (noise(100_000, 1), text(100_000, 2)):
        with pytest.raises(FormatError, match="not a tar archive"):
            build(gzip.compress(data, mtime=0))
        with pytest.raises(FormatError, match="not a tar archive"):
            build(data, "none")
    with pytest.raises(FormatError, match="incorrect header check|not gzip"):
        build(noise(10_000, 3))
    with pytest.raises(FormatError, match="empty"):
        build(b"")


def test_trailing_garbage_after_gzip_member() -> None:
    blob = gzip.compress(all_types_tar(), mtime=0) + b"garbage!"
    with pytest.raises(FormatError, match="corrupt deflate data"):
        build(blob)


def test_zstd_and_unknown_compression() -> None:
    with pytest.raises(UnsupportedCompressionError, match="zstd"):
        build(b"whatever", "zstd")
    with pytest.raises(UnsupportedCompressionError):
        build(b"whatever", "bzip2")


def test_unsupported_entry_types() -> None:
    raw = bytearray(tar_bytes([Entry("a", data=b"12345")], format=tarfile.USTAR_FORMAT))
    for flag in (b"7", b"V", b"S"):
        hdr = raw[:512]
        hdr[156:157] = flag
        hdr[148:156] = b"        "
        hdr[148:156] = b"%06o\0 " % sum(hdr)
        with pytest.raises(FormatError, match="unsupported tar entry type|sparse"):
            build(bytes(hdr) + bytes(raw[512:]), "none")


def test_pax_sparse_is_rejected() -> None:
    raw = tar_bytes([Entry("s", data=b"x", pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"})])
    with pytest.raises(FormatError, match="sparse files are not supported"):
        build(raw, "none")


# -- hostile zTOCs -------------------------------------------------------------------

def test_not_a_flatbuffer() -> None:
    for data in (b"", b"\0" * 4, noise(64, 1), noise(5000, 2), b"\xff\xff\xff\x7f" + bytes(60)):
        with pytest.raises(FormatError, match="not a valid FlatBuffer|not supported|lacks"):
            Ztoc.parse(data)


def test_every_truncation_and_many_bit_flips_fail_cleanly(parts) -> None:
    data = assemble(parts)
    Ztoc.parse(data)
    for cut in list(range(0, 600, 7)) + list(range(600, len(data), max(1, len(data) // 300))):
        with pytest.raises(FormatError):
            Ztoc.parse(data[:cut])
    rnd = random.Random(11)
    table_area = min(len(data), 20_000)
    for _ in range(400):   # flips either leave a valid zTOC or raise FormatError; nothing else escapes
        bad = bytearray(data)
        pos = rnd.randrange(table_area)
        bad[pos] ^= 1 << rnd.randrange(8)
        try:
            z = Ztoc.parse(bytes(bad))
            for i in range(len(z)):
                z.entry(i)
        except FormatError:
            pass


def test_offsets_beyond_the_archive(parts) -> None:
    raw, blob, entries = parts[:3]
    last = len(entries) - 1
    moved = entries[:last] + [entries[last]._replace(offset=len(raw) + 512, size=1)]
    with pytest.raises(FormatError, match="lies outside the .*archive"):
        Ztoc.parse(assemble(parts, entries=moved))
    big = [e._replace(size=len(raw)) if e.type == "reg" else e for e in entries]
    with pytest.raises(FormatError, match="lies outside"):
        Ztoc.parse(assemble(parts, entries=big))
    with pytest.raises(FormatError, match="lies outside"):
        Ztoc.parse(assemble(parts, entries=[entries[0]._replace(offset=-5)]))


def test_overlapping_entries(parts) -> None:
    entries = parts[2]
    regs = [i for i, e in enumerate(entries) if e.type == "reg" and e.size > 1000]
    a = entries[regs[0]]
    overlapping = list(entries) + [a._replace(name=b"evil", offset=a.offset + 512, size=10)]
    with pytest.raises(FormatError, match="overlap"):
        Ztoc.parse(assemble(parts, entries=overlapping))
    same = list(entries) + [entries[1]._replace(name=b"twin")]
    with pytest.raises(FormatError, match="overlap"):
        Ztoc.parse(assemble(parts, entries=same))


def test_bad_entry_type(parts) -> None:
    entries = list(parts[2])
    entries[0] = entries[0]._replace(type="socket")
    with pytest.raises(FormatError, match="type 'socket'"):
        Ztoc.parse(assemble(parts, entries=entries))


def test_span_ids_out_of_range(parts) -> None:
    digests = parts[3]
    with pytest.raises(FormatError, match="max_span_id 17 does not match its 19 spans"):
        Ztoc.parse(assemble(parts, span_digests=digests[:-1]))
    with pytest.raises(FormatError, match="span digests|max_span_id"):
        Ztoc.parse(assemble(parts, span_digests=digests + digests[:1]))
    with pytest.raises(FormatError, match="not a sha256 digest"):
        Ztoc.parse(assemble(parts, span_digests=["md5:00"] + digests[1:]))
    z = Ztoc.parse(assemble(parts))
    for bad in (-1, z.num_spans, 1 << 40):
        with pytest.raises(FormatError, match="span id .* out of range"):
            z.span_compressed_range(bad)
        with pytest.raises(FormatError, match="out of range"):
            decompress_span(z, bad, b"")


def test_checkpoint_blob_of_wrong_length(parts) -> None:
    cps = parts[4]
    for bad in (cps[:-1], cps + b"\0", cps[:12 + CHECKPOINT_SIZE // 2], cps[:5], b""):
        with pytest.raises(FormatError, match="fits neither zinfo v2 .* nor v1|too short"):
            Ztoc.parse(assemble(parts, checkpoints=bad))


def test_checkpoints_out_of_order_or_outside_the_layer(parts) -> None:
    import struct
    cps = bytearray(parts[4])
    struct.pack_into("<q", cps, 12 + CHECKPOINT_SIZE * 2, 1 << 40)    # checkpoint 2's `in`
    with pytest.raises(FormatError, match="checkpoint 2 .* outside"):
        Ztoc.parse(assemble(parts, checkpoints=bytes(cps)))
    cps = bytearray(parts[4])
    struct.pack_into("<q", cps, 12 + CHECKPOINT_SIZE * 3 + 8, 5)       # checkpoint 3's `out`
    with pytest.raises(FormatError, match="checkpoint 3 .* out of order"):
        Ztoc.parse(assemble(parts, checkpoints=bytes(cps)))


def test_wrong_span_bytes(parts) -> None:
    raw, blob = parts[:2]
    z = Ztoc.parse(assemble(parts))
    cs, ce = z.span_compressed_range(2)
    piece = bytearray(blob[cs:ce])
    piece[10] ^= 0x40
    with pytest.raises(IntegrityError, match="span 2 digest mismatch"):
        verify_span(z, 2, bytes(piece))
    with pytest.raises(FormatError, match="expected"):
        decompress_span(z, 2, blob[cs:ce - 1])
    with pytest.raises(FormatError):   # garbage of the right length never yields silent bytes
        decompress_span(z, 2, noise(ce - cs, 5))


def test_mutated_tar_streams_fail_cleanly() -> None:
    """Random damage to tar headers either still parses or raises FormatError, never anything else."""
    raw = tar_bytes([Entry("d", "dir"), Entry("d/f", data=text(3000, 1), pax={"LAZYOCI.k": "v"}),
                     Entry("d/" + "l" * 150, "symlink", linkname="f"), Entry("d/g", data=b"x" * 700)])
    headers = [m.offset for m in tarfile.open(fileobj=io.BytesIO(raw)).getmembers()]
    rnd = random.Random(3)
    for _ in range(400):
        bad = bytearray(raw)
        at = rnd.choice(headers + [0, 512, 1024])
        for _ in range(rnd.randint(1, 4)):
            pos = at + rnd.randrange(512)
            bad[pos] = rnd.choice([0, 0x80, 0xFF, ord("7"), ord(" "), rnd.randrange(256)])
        if rnd.random() < 0.5:   # keep the checksum right so the damage reaches the field parsers
            h = at
            bad[h + 148:h + 156] = b"        "
            bad[h + 148:h + 156] = b"%06o\0 " % sum(bad[h:h + 512])
        try:
            Ztoc.parse(build(bytes(bad), "none"))
        except FormatError:
            pass


def test_huge_numeric_fields_are_rejected() -> None:
    for field, value in ((slice(100, 108), b"\x80" + b"\xff" * 7),        # base-256 mode of ~2^56: fits
                         (slice(108, 116), b"\x80" + b"\x7f" * 7),        # uid beyond uint32
                         (slice(124, 136), b"\x80" + b"\xff" * 11)):      # size of ~2^88
        raw = bytearray(tar_bytes([Entry("big", data=b"x")], format=tarfile.GNU_FORMAT))
        raw[field] = value
        raw[148:156] = b"        "
        raw[148:156] = b"%06o\0 " % sum(raw[:512])
        if field.start == 100:
            assert Ztoc.parse(build(bytes(raw), "none")).entry(0).mode == int.from_bytes(b"\x00" + b"\xff" * 7, "big")
            continue
        with pytest.raises(FormatError, match="out of range"):
            build(bytes(raw), "none")


def _pax_through_the_generic_reader(data: bytes, vec: int) -> list[tuple[bytes, bytes]]:
    """The PAX records of the vector at `vec` read with the bounds-checked FlatReader alone,
    field by field: what the zTOC reader's decode (one cached plan per vtable) must agree with."""
    r = C.FlatReader(data, "zTOC")
    xs, xn = r.vector(vec, 4)
    out = []
    for k in range(xn):
        x = r.table(r.deref(xs + 4 * k))
        out.append((r.bytes_field(x, 0), r.bytes_field(x, 1)))
    return out


def test_pax_records_under_hostile_words() -> None:
    """Every 4-byte word of a zTOC with PAX records overwritten with a large or a small value: the
    zTOC is refused, or each entry's PAX records decode to what the generic FlatBuffer reader
    finds, or raise FormatError where it refuses them too. (No xattrs: the parse then leaves the
    records to be checked when an entry is decoded.)"""
    data = build(tar_bytes([Entry("a", data=b"x", pax={"LAZYOCI.k": "v", "LAZYOCI.other": "w" * 40}),
                            Entry("b", data=b"y", pax={"mtime": "1700000000.5"})]), "none")
    z = Ztoc.parse(data)
    assert sum(1 for i in range(len(z)) if z.entry(i).pax) >= 2
    compared = refused = 0
    for pos in range(0, len(data) - 3, 4):
        for word in (b"\xf0\xff\xff\x7f", b"\x10\x00\x00\x00"):
            bad = data[:pos] + word + data[pos + 4:]
            try:
                z = Ztoc.parse(bad)
            except FormatError:
                continue
            for i in range(len(z)):
                vec = z._fields(i)[C.FM_XATTRS]
                if not vec:
                    continue
                try:
                    want = _pax_through_the_generic_reader(bad, vec)
                except FormatError:
                    with pytest.raises(FormatError):
                        z._pax(vec)
                    with pytest.raises(FormatError):
                        z.entry(i)
                    refused += 1
                    continue
                assert z._pax(vec) == want, (pos, word, i)
                compared += 1
    assert compared and refused
