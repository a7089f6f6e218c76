"""The one tar header reader: the unpacker and the zTOC builder see the same entries, as Go's archive/tar
(the reference SOCI tools, containerd) sees them, on the edge cases where lazyoci's two readers used to
differ from each other or from Go. Each case goes through both real paths: `apply_layer_stream` into a
directory, and `build_ztoc` read back with `Ztoc.parse`."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from lazyoci.errors import FormatError
from lazyoci.snapshot.unpack import apply_layer_stream
from lazyoci.snapshot.inflating_reader import ForwardFile
from lazyoci.tar import HeaderFeed, first_entry, iter_headers
from lazyoci.ztoc import Ztoc, build_ztoc

TAR = "application/vnd.oci.image.layer.v1.tar"


def header(name: bytes, size: int = 0, flag: bytes = b"0", *, mode: bytes = b"0000644\0",
           uid: bytes = b"0000000\0", gid: bytes = b"0000000\0", mtime: bytes = b"14532444000\0",
           magic: bytes = b"ustar\x0000", linkname: bytes = b"", checksum_delta: int = 0) -> bytes:
    """One 512-byte header block, fields as given, with its checksum (plus `checksum_delta`)."""
    b = bytearray(512)
    b[0:len(name)] = name
    b[100:108], b[108:116], b[116:124] = mode, uid, gid
    b[124:136] = b"%011o\0" % size
    b[136:148] = mtime
    b[148:156] = b" " * 8
    b[156:157] = flag
    b[157:157 + len(linkname)] = linkname
    b[257:265] = magic
    b[148:156] = b"%06o\0 " % (sum(b) + checksum_delta)
    return bytes(b)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member(name: bytes, data: bytes = b"", flag: bytes = b"0", **fields: bytes) -> bytes:
    return header(name, len(data), flag, **fields) + padded(data)   # type: ignore[arg-type]


def pax(records: bytes, flag: bytes = b"x") -> bytes:
    return header(b"PaxHeader", len(records), flag) + padded(records)


def record(key: str, value: str) -> bytes:
    """A PAX record "<length> <key>=<value>\\n", its length counting its own digits."""
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


END = bytes(1024)


def unpack(tar: bytes, tmp_path: Path) -> Path:
    dest = tmp_path / "layer"
    dest.mkdir()
    apply_layer_stream(tar, TAR, dest)
    return dest


def ztoc_entries(tar: bytes) -> dict[str, object]:
    z = Ztoc.parse(build_ztoc(io.BytesIO(tar), "none"))
    return {z.entry(i).name: z.entry(i) for i in range(len(z))}


def both_refuse(tar: bytes, tmp_path: Path, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        build_ztoc(io.BytesIO(tar), "none")
    (tmp_path / "refused").mkdir(parents=True)
    with pytest.raises(FormatError, match=match):
        apply_layer_stream(tar, TAR, tmp_path / "refused")


def test_octal_fields_are_trimmed_of_leading_nuls_and_spaces_as_go_does(tmp_path):
    """Go trims spaces and NULs at both ends of an octal field; both readers used to stop at the
    first NUL and read such a mode as 0."""
    tar = member(b"f", b"x", mode=b"\x00\x00\x000755\x00", uid=b" 1750\0  ") + END
    assert ztoc_entries(tar)["f"].mode == 0o755
    st = os.lstat(unpack(tar, tmp_path) / "f")
    assert (st.st_mode & 0o7777, st.st_uid) == (0o755, 0o1750)


def test_negative_base256_is_read_as_go_reads_it(tmp_path):
    """Bit 6 of a base-256 field is the sign, whatever the other bits: the unpacker took only 0xff
    as negative, and read this uid (about -2**62) as 5."""
    tar = member(b"f", b"x", uid=b"\xc0" + bytes(6) + b"\x05") + END
    both_refuse(tar, tmp_path, "uid .*out of range")
    negative_pax = pax(record("uid", "-5")) + member(b"f", b"x") + END      # was an OverflowError
    both_refuse(negative_pax, tmp_path / "pax", "uid .*out of range")


def test_octal_fields_with_signs_or_underscores_are_not_numbers(tmp_path):
    """Python's int() takes "+7", "7_5" and tabs; Go's strconv does not."""
    for mode in (b"+000644\0", b"0_644\0\0\0", b"\t000644\0"):
        tar = member(b"f", b"x", mode=mode) + END
        both_refuse(tar, tmp_path / mode.hex(), "mode field")


def test_checksum_is_exact_not_modulo_65521(tmp_path):
    tar = member(b"f", b"x", checksum_delta=65521) + END
    both_refuse(tar, tmp_path, "checksum")


def test_gnu_long_name_wins_over_pax_path_and_empty_pax_values_keep_the_header(tmp_path):
    """Go applies PAX records, then a GNU long name; a PAX record with an empty value keeps the
    header's value. Both readers let "path" win, and "path=" emptied the name (the unpacker then
    skipped the file)."""
    long_name = b"long/" + b"n" * 120
    tar = (member(b"long", flag=b"5") + header(b"././@LongLink", len(long_name) + 1, b"L")
           + padded(long_name + b"\0") + pax(record("path", "from-pax")) + member(b"short", b"A")
           + pax(record("path", "") + record("uname", "")) + member(b"kept", b"B") + END)
    entries = ztoc_entries(tar)
    assert long_name.decode() in entries and "kept" in entries and "from-pax" not in entries
    dest = unpack(tar, tmp_path)
    assert (dest / long_name.decode()).read_bytes() == b"A"
    assert (dest / "kept").read_bytes() == b"B"


def test_empty_size_uid_gid_records_keep_the_header_and_a_pax_path_ending_in_slash_is_a_directory(tmp_path):
    """Go's mergePAX skips a record with an empty value before parsing it, so `size=`, `uid=` and
    `gid=` keep the ustar numbers instead of failing; an old-style `\\0` entry is a directory when
    its final name (here from PAX `path`) ends in a slash."""
    tar = (pax(record("size", "") + record("uid", "") + record("gid", ""))
           + member(b"f", b"xyz", uid=b"0001750\0", gid=b"0001751\0")
           + pax(record("path", "d/")) + member(b"x", flag=b"\0") + END)
    entries = ztoc_entries(tar)
    assert (entries["f"].size, entries["f"].uid, entries["f"].gid) == (3, 1000, 1001)
    assert entries["d/"].type == "dir"
    dest = unpack(tar, tmp_path)
    assert (dest / "f").read_bytes() == b"xyz" and (dest / "d").is_dir()


def test_a_global_pax_header_is_dropped_as_containerd_drops_it(tmp_path):
    """Go returns a `g` header as an entry of its own (ending what an `x` header or GNU long name
    before it announced) and containerd's unpacker skips that entry: its records apply to no file.
    The zTOC builder and the unpacker both drop it, so the lazy view and the unpack agree."""
    glob = pax(record("SCHILY.xattr.user.g", "1") + record("uname", "glob") + record("mtime", "1"), b"g")
    tar = (member(b"a", b"1") + glob + member(b"b", b"2")
           + pax(record("path", "renamed")) + glob + member(b"c", b"3") + END)
    entries = ztoc_entries(tar)
    assert set(entries) == {"a", "b", "c"}
    assert entries["b"].xattrs == {} and entries["b"].uname == "" and entries["b"].mtime_ns == 0o14532444000 * 10**9
    dest = unpack(tar, tmp_path)
    assert os.listxattr(dest / "b") == [] and (dest / "c").read_bytes() == b"3"
    assert os.lstat(dest / "b").st_mtime_ns == entries["b"].mtime_ns


def test_a_second_pax_header_replaces_the_first(tmp_path):
    tar = pax(record("SCHILY.xattr.user.a", "1")) + pax(record("SCHILY.xattr.user.b", "2")) \
        + member(b"f", b"x") + END
    assert ztoc_entries(tar)["f"].xattrs == {"user.b": b"2"}
    assert os.listxattr(unpack(tar, tmp_path) / "f") == ["user.b"]


def test_a_zero_block_then_a_header_is_refused(tmp_path):
    """One zero block followed by more entries is not an end of archive (Go: ErrHeader); the
    unpacker used to stop there and leave the rest of the layer out."""
    tar = member(b"a", b"1") + bytes(512) + member(b"b", b"2") + END
    both_refuse(tar, tmp_path, "end-of-archive")


def test_a_tar_ending_in_its_last_files_padding_is_complete(tmp_path):
    """Go reads a stream that stops after the last file's data, before its padding, as ended;
    the zTOC builder called it truncated."""
    tar = member(b"a", b"1") + header(b"b", 3) + b"xyz"
    assert set(ztoc_entries(tar)) == {"a", "b"}
    assert (unpack(tar, tmp_path) / "b").read_bytes() == b"xyz"
    short = member(b"a", b"1") + header(b"b", 3) + b"xy"
    both_refuse(short, tmp_path / "short", "truncated")


@pytest.mark.parametrize("records", [
    record("uid", "1_000"), record("uid", " 1000"), record("mtime", "1e9"), record("size", "0x10"),
    record("path", "a\0b"), record("", "v"), record("k", "v") + b"\0" * 8, b"3 k=v\n",
], ids=["underscore", "space", "float-time", "hex-size", "nul-path", "empty-key", "nul-padding", "short-length"])
def test_malformed_pax_records_are_refused_as_go_refuses_them(tmp_path, records):
    tar = pax(records) + member(b"f", b"x") + END
    both_refuse(tar, tmp_path, "PAX")


def test_pax_over_go_limit_is_refused(tmp_path):
    big = record("SCHILY.xattr.user.big", "v" * (1 << 20))
    both_refuse(pax(big) + member(b"f", b"x") + END, tmp_path, "extended header")


def test_pax_times_follow_go(tmp_path):
    """A sign, a bare trailing dot and more than nine fraction digits are Go's; `-0.5` is half a
    second before the epoch."""
    tar = (pax(record("mtime", "+1700000000.")) + member(b"a", b"1")
           + pax(record("mtime", "1700000000.1234567899")) + member(b"b", b"2") + END)
    entries = ztoc_entries(tar)
    assert entries["a"].mtime_ns == 1_700_000_000 * 10**9
    assert entries["b"].mtime_ns == 1_700_000_000 * 10**9 + 123_456_789
    dest = unpack(tar, tmp_path)
    assert os.lstat(dest / "b").st_mtime_ns == entries["b"].mtime_ns


def test_v7_headers_have_no_owner_names_and_the_two_drivers_agree():
    """A v7 header (no ustar magic) has no uname, gname or device fields, as in Go; the pull driver
    and the push driver (fed a byte at a time) give the same entries."""
    tar = member(b"f", b"x", magic=bytes(8)) + member(b"d/", flag=b"\0") + END
    raw = bytearray(tar)
    raw[265:270] = b"alice"                       # a uname field in a v7 header is not one
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    pulled = list(iter_headers(io.BytesIO(bytes(raw))))   # type: ignore[arg-type]
    feed = HeaderFeed()
    for i in range(len(raw)):
        feed.feed(bytes(raw[i:i + 1]))
    assert feed.finish() == pulled
    assert [(h.name, h.type, h.uname) for h in pulled] == [(b"f", "reg", b""), (b"d/", "dir", b"")]


@pytest.mark.parametrize("data", [
    b"", END, member(b"f", b"data") + END, pax(record("path", "long/" * 40)) + member(b"f", b"x"),
    header(b"././@LongLink", 300, b"L") + padded(b"n" * 300) + member(b"f"),
    pax(record("uname", "g"), b"g") + member(b"f", b"1"), bytes(512) + member(b"f"),
    member(b"f")[:700], pax(record("mtime", "1.5"))[:600], header(b"f", checksum_delta=1),
    pax(record("uid", "x")) + member(b"f"), b"\xff" * 512,
], ids=["empty", "end", "one", "pax-path", "gnu-long-name", "global-pax", "zero-block-first",
        "truncated-header", "truncated-pax", "bad-checksum", "bad-pax", "garbage"])
def test_first_entry_reads_bytes_as_iter_headers_reads_a_file(data):
    """The header checks parse each region in memory (`first_entry`): the same entry as the pull
    driver's first, or the same refusal."""
    def first(read):
        try:
            return read()
        except FormatError as e:
            return f"refused: {e}"
    from_file = first(lambda: next(iter_headers(ForwardFile(io.BytesIO(data))), None))
    assert first(lambda: first_entry(data)) == from_file


def test_pax_record_lengths_and_times_with_a_sign_follow_go():
    """Digits alone take the short way; a sign or other text still goes through Go's rules."""
    from lazyoci.tar.headers import parse_pax, parse_pax_time
    assert parse_pax_time(b"-1.5", 0) == -1_500_000_000
    assert parse_pax_time(b"+2", 0) == 2_000_000_000
    assert parse_pax_time(b"12.000000001", 0) == 12_000_000_001
    for bad in (b"", b"1.x", b"1_0", b"\xd9\xa1", b"9223372036854775808"):
        with pytest.raises(FormatError):
            parse_pax_time(bad, 0)
    assert parse_pax(b"+13 path=abc\n", 0) == [(b"path", b"abc")]
    for bad in (b"1_2 path=abcd\n", b"12path=abcde\n", b" 12 path=abc\n"):
        with pytest.raises(FormatError):
            parse_pax(bad, 0)
