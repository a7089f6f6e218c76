"""The one tar header reader: the unpacker, the zTOC builder and the header checks all read with it.

`HeaderReader` decodes header blocks in stream order and knows nothing of where the
bytes come from; drivers move them: `iter_headers` pulls from a forward-only file (the
unpacker, the whole-layer check), `first_entry` reads bytes in memory (the per-entry
header checks), `HeaderFeed` is pushed chunks of any size (the zTOC builder, straight
from the inflater). Only headers are decoded; file data is skipped by arithmetic, so
the cost is per entry, not per byte.

Semantics are Go's archive/tar, which the reference SOCI tools and containerd read
layers with, so that lazyoci sees the entries, offsets and attributes they see
(`docs/TAR.md` lists the edge cases). A global PAX header (`g`) is read and then
dropped, as containerd's unpacker drops the entry Go returns for it, so unpacked,
indexed and lazily served layers agree; sparse files are refused.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator
from typing import NamedTuple, Protocol

from lazyoci.errors import FormatError

BLOCK = 512
MAX_EXTENDED = 1 << 20   # a PAX or GNU long-name payload over this is refused, as Go refuses it

# typeflag -> type name; all but "contiguous" are the zTOC's names too (docs/TAR.md)
TYPE_NAMES = {b"0": "reg", b"\0": "reg", b"1": "hardlink", b"2": "symlink", b"3": "char",
              b"4": "block", b"5": "dir", b"6": "fifo", b"7": "contiguous"}
HEADER_ONLY = frozenset(("hardlink", "symlink", "char", "block", "dir", "fifo"))
XATTR_PREFIX = b"SCHILY.xattr."
_EXTENDED = frozenset((b"x", b"g", b"L", b"K"))
_ZERO_BLOCK = bytes(BLOCK)
_MAX_INT64 = 1 << 63
_MAX_ID = (1 << 32) - 1

# name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic + version, uname, gname,
# devmajor, devminor, prefix (155 bytes; STAR's is 131, then atime and ctime)
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")


class TarHeader(NamedTuple):
    """One tar entry as its headers (PAX records and GNU long names applied) describe it.

    Names are raw bytes, as in the tar; `path` and `link` decode them the way the rest of
    lazyoci does (UTF-8, undecodable bytes kept by surrogateescape)."""

    name: bytes
    type: str            # TYPE_NAMES' value, or the typeflag itself for any other type
    offset: int          # where the data starts in the uncompressed tar stream
    size: int            # the header's size (PAX `size` if given)
    linkname: bytes
    mode: int
    uid: int
    gid: int
    uname: bytes
    gname: bytes
    mtime_ns: int
    devmajor: int
    devminor: int
    pax: tuple[tuple[bytes, bytes], ...]   # the entry's own PAX records, sorted by key

    @property
    def path(self) -> str:
        return self.name.decode("utf-8", "surrogateescape")

    @property
    def link(self) -> str:
        return self.linkname.decode("utf-8", "surrogateescape")

    @property
    def data_length(self) -> int:
        """Bytes of data and padding after the header: none for the header-only types, whatever
        their size field says (Go's rule)."""
        return 0 if self.type in HEADER_ONLY else -(-self.size // BLOCK) * BLOCK

    def xattrs(self) -> dict[str, bytes]:
        """The SCHILY.xattr.* records, prefix stripped, raw values."""
        n = len(XATTR_PREFIX)
        return {k[n:].decode("utf-8", "surrogateescape"): v for k, v in self.pax if k.startswith(XATTR_PREFIX)}


def _bad(what: str, field: bytes, at: int, why: str = "is not a number") -> FormatError:
    return FormatError(f"not a tar archive: the {what} field {field!r} in the header at offset {at} {why}")


def _base256(field: bytes, what: str, at: int) -> int:
    """GNU base-256: bit 7 of the first byte marks it, bit 6 is the sign (two's complement);
    a magnitude of 2**63 or more is refused, as Go refuses it."""
    negative = field[0] & 0x40
    value = int.from_bytes(field, "big") & ((1 << (8 * len(field) - 1)) - 1)
    if negative:
        value = (1 << (8 * len(field) - 1)) - 1 - value       # the bits inverted; the number is -value-1
    if value >= _MAX_INT64:
        raise _bad(what, field, at, "is out of range")
    return -value - 1 if negative else value


_OCTAL_DIGITS = re.compile(rb"[0-7]+")
_NUMBERS: dict[bytes, int] = {}   # mode, uid, gid, mtime fields repeat across a layer's entries


def number(field: bytes, what: str, at: int) -> int:
    """A numeric header field: octal text (spaces and NULs trimmed at both ends, then up to the
    first NUL), or base-256. Memoised: this runs several times per entry."""
    value = _NUMBERS.get(field)
    if value is not None:
        return value
    if field and field[0] & 0x80:
        return _base256(field, what, at)
    text = field.strip(b" \0").partition(b"\0")[0]
    if text and not _OCTAL_DIGITS.fullmatch(text):
        raise _bad(what, field, at)
    value = int(text, 8) if text else 0
    if len(_NUMBERS) < 8192:
        _NUMBERS[field] = value
    return value


def checksum_ok(block: bytes, field: bytes) -> bool:
    """The stored checksum equals the byte sum with its own field read as 8 spaces, unsigned or
    (as old writers summed) signed bytes. adler32's low half is 1 + that sum modulo 65521, in C:
    exact when at most 256 bytes are not NUL (as in most headers), else summed per half block
    (a half sums below 65521). `field` is the checksum field, block[148:156]."""
    text = field.partition(b"\0")[0]
    if not text.isdigit():                 # not the usual "%06o\0 ": trim as Go does
        text = field.strip(b" \0").partition(b"\0")[0]
        if not text.isdigit():
            return False
    try:
        want = int(text, 8)
    except ValueError:                     # an 8 or a 9
        return False
    if block.count(0) >= 256:
        total = (zlib.adler32(block) & 0xFFFF) - 1
    else:
        view = memoryview(block)
        total = (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2
    unsigned = total - sum(field) + 256
    if want == unsigned:
        return True
    return want == unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)


def parse_pax(data: bytes, at: int) -> list[tuple[bytes, bytes]]:
    """PAX records "<length> <key>=<value>\\n", all of `data`, as raw (key, value) pairs; Go's rules:
    a non-empty key without NUL, no NUL in path, linkpath, uname and gname."""
    out: list[tuple[bytes, bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        sp = data.find(b" ", pos)
        digits = data[pos:sp] if sp > pos else b""
        length = int(digits) if digits.isdigit() or _SIGNED.fullmatch(digits) else -1
        rec = data[sp + 1:pos + length] if length >= 5 and pos + length <= end else b""
        key, eq, value = rec[:-1].partition(b"=")
        if not rec.endswith(b"\n") or not eq or not key or b"\0" in key \
                or (key in _NO_NUL and b"\0" in value):
            raise FormatError(f"not a tar archive: malformed PAX record in the header at offset {at}")
        out.append((key, value))
        pos += length
    return out


_SIGNED = re.compile(rb"[+-]?[0-9]+")
_NO_NUL = frozenset((b"path", b"linkpath", b"uname", b"gname"))
_PAX_TIME = frozenset((b"mtime", b"atime", b"ctime"))


def _pax_int(value: bytes, key: bytes, at: int) -> int:
    if not _SIGNED.fullmatch(value) or not -_MAX_INT64 <= int(value) < _MAX_INT64:
        raise FormatError(f"not a tar archive: bad PAX {key.decode()} {value!r} in the header at offset {at}")
    return int(value)


def _id(value: int, what: str, at: int) -> int:
    """A uid or gid: Linux's are 32-bit unsigned (Go would take any int; the zTOC holds uint32)."""
    if not 0 <= value <= _MAX_ID:
        raise FormatError(f"not a tar archive: the {what} {value} in the header at offset {at} is out of range")
    return value


def parse_pax_time(value: bytes, at: int) -> int:
    """A PAX time "[sign]sec[.frac]" in nanoseconds (fraction truncated to 9 digits, as Go does)."""
    sec, dot, frac = value.partition(b".")
    if not (sec.isdigit() or _SIGNED.fullmatch(sec)) or (frac and not frac.isdigit()) \
            or not -_MAX_INT64 <= int(sec) < _MAX_INT64:
        raise FormatError(f"not a tar archive: bad PAX time {value!r} in the header at offset {at}")
    ns = int((frac + b"000000000")[:9])
    return int(sec) * 1_000_000_000 + (-ns if sec.startswith(b"-") else ns)


class HeaderReader:
    """Decodes header blocks in stream order; the caller moves the bytes.

    `header` takes each block at a header position. When it returns None for an extended
    header, `pending` is the payload's length padded to blocks: the caller reads that many
    bytes and passes them to `extended`. After an entry, the caller skips its `data_length`.
    """

    def __init__(self) -> None:
        self.pending = 0                     # padded length of an extended payload to read next
        self.data_length = 0                 # the last entry's `data_length`
        self.ended = False                   # two zero blocks were read: nothing after them is read
        self._extended: tuple[bytes, int, int] = (b"", 0, 0)   # (typeflag, header offset, size)
        self._local: dict[bytes, bytes] | None = None
        self._longname = b""
        self._longlink = b""
        self._long = False                   # a GNU long name or link is waiting for its entry
        self._zero_blocks = 0

    def header(self, block: bytes, end: int) -> TarHeader | None:
        """The entry of the header block that ends at stream offset `end`, or None (a zero block,
        or an extended header: see `pending`). FormatError if the block is not a tar header."""
        at = end - BLOCK
        if block == _ZERO_BLOCK:
            self._zero_blocks += 1
            self.ended = self._zero_blocks == 2
            return None
        if self._zero_blocks:
            raise FormatError(f"not a tar archive: a header after an end-of-archive block at offset {at}")
        (name, mode, uid, gid, size, mtime, checksum, flag, linkname, magic, uname, gname,
         devmajor, devminor, prefix) = _HEADER.unpack(block)
        if not checksum_ok(block, checksum):
            raise FormatError(f"not a tar archive: bad header checksum at offset {at}")
        cache = _NUMBERS
        size = cache[size] if size in cache else number(size, "size", at)
        if flag in _EXTENDED:
            if not 0 <= size <= MAX_EXTENDED:
                raise FormatError(f"tar extended header at offset {at} has a size of {size} bytes "
                                  f"(at most {MAX_EXTENDED})")
            self._extended = (flag, at, size)
            self.pending = -(-size // BLOCK) * BLOCK
            if not self.pending:
                self.extended(b"")
            return None
        if flag == b"S":
            raise FormatError(f"sparse files are not supported (GNU sparse entry at offset {at})")
        kind = TYPE_NAMES.get(flag) or flag.decode("latin-1")
        mode = cache[mode] if mode in cache else number(mode, "mode", at)
        uid = cache[uid] if uid in cache else _id(number(uid, "uid", at), "uid", at)
        gid = cache[gid] if gid in cache else _id(number(gid, "gid", at), "gid", at)
        mtime_ns = (cache[mtime] if mtime in cache else number(mtime, "mtime", at)) * 1_000_000_000
        name = name.partition(b"\0")[0]
        linkname = linkname.partition(b"\0")[0]
        ustar = magic[:6] == b"ustar\0"
        if ustar or magic == b"ustar  \0":               # GNU; v7 headers have none of these fields
            uname, gname = uname.partition(b"\0")[0], gname.partition(b"\0")[0]
            devmajor = cache[devmajor] if devmajor in cache else number(devmajor, "devmajor", at)
            devminor = cache[devminor] if devminor in cache else number(devminor, "devminor", at)
            if ustar and prefix[0]:                       # GNU headers have no name prefix
                prefix = (prefix[:131] if block[508:] == b"tar\0" else prefix).partition(b"\0")[0]
                name = prefix + b"/" + name
        else:
            uname = gname = b""
            devmajor = devminor = 0
        pax: tuple[tuple[bytes, bytes], ...] = ()
        records = self._local
        if records is not None:
            self._local = None
            for key, value in records.items():
                if not value:
                    continue                                # an empty record keeps the header's value
                if key == b"path":
                    name = value
                elif key == b"linkpath":
                    linkname = value
                elif key == b"uname":
                    uname = value
                elif key == b"gname":
                    gname = value
                elif key == b"size":
                    size = _pax_int(value, key, at)
                elif key == b"uid":
                    uid = _id(_pax_int(value, key, at), "uid", at)
                elif key == b"gid":
                    gid = _id(_pax_int(value, key, at), "gid", at)
                elif key in _PAX_TIME:
                    ns = parse_pax_time(value, at)
                    if key == b"mtime":
                        mtime_ns = ns
            pax = tuple(sorted(records.items()))
        if self._long:
            self._long = False
            if self._longname:
                name, self._longname = self._longname, b""
            if self._longlink:
                linkname, self._longlink = self._longlink, b""
        if flag == b"\0" and name.endswith(b"/"):
            kind = "dir"                                    # old v7 archives mark directories by the slash
        if size < 0:
            raise FormatError(f"not a tar archive: negative size in the header at offset {at}")
        self.data_length = 0 if kind in HEADER_ONLY else -(-size // BLOCK) * BLOCK
        return TarHeader(name, kind, end, size, linkname, mode, uid, gid, uname, gname, mtime_ns,
                         devmajor, devminor, pax)

    def extended(self, payload: bytes) -> None:
        """The payload of the extended header `header` announced (padding may follow it)."""
        flag, at, size = self._extended
        self.pending = 0
        payload = payload[:size]
        if flag == b"L":
            self._longname = payload.partition(b"\0")[0]
            self._long = True
        elif flag == b"K":
            self._longlink = payload.partition(b"\0")[0]
            self._long = True
        else:
            records = parse_pax(payload, at)
            if flag == b"g":
                # Go returns a global header as an entry of its own, which ends what an `x` header
                # or a GNU long name before it announced; containerd then skips that entry.
                self._local, self._longname, self._longlink, self._long = None, b"", b"", False
                return
            for key, _ in records:
                if key.startswith(b"GNU.sparse."):
                    raise FormatError(f"sparse files are not supported "
                                      f"(PAX {key.decode(errors='replace')} at offset {at})")
            self._local = dict(records)                     # a second `x` replaces the first, as in Go


class ForwardReader(Protocol):
    """What `iter_headers` reads from: a forward-only file that can skip ahead."""

    def read(self, size: int) -> bytes: ...
    def seek(self, offset: int) -> int: ...
    def tell(self) -> int: ...


def iter_headers(f: ForwardReader) -> Iterator[TarHeader]:
    """Entries in archive order, read from `f`; stops at the end-of-archive marker or a clean end
    of file. Between two entries the caller may read the data; the next step skips what is left."""
    reader = HeaderReader()
    while not reader.ended:
        block = f.read(BLOCK)
        if not block:
            return
        if len(block) != BLOCK:
            raise FormatError(f"invalid layer tar: truncated header at offset {f.tell() - len(block)}")
        header = reader.header(block, f.tell())
        if header is None:
            if reader.pending:
                payload = f.read(reader.pending)
                if len(payload) != reader.pending:
                    raise FormatError("invalid layer tar: truncated extended header")
                reader.extended(payload)
            continue
        yield header
        length = header.data_length
        if length and f.seek(header.offset + length) < header.offset + header.size:
            raise FormatError(f"invalid layer tar: truncated data of {header.path!r}")


def first_entry(data: bytes) -> TarHeader | None:
    """The first entry of tar bytes held in memory: what `iter_headers` yields first over a file
    of `data`, without the file. For the header checks, which parse one short region (an entry's
    header records) at a time, thousands of them while a workload starts."""
    reader = HeaderReader()
    pos, end = 0, len(data)
    while not reader.ended and pos < end:
        block = data[pos:pos + BLOCK]
        if len(block) != BLOCK:
            raise FormatError(f"invalid layer tar: truncated header at offset {pos}")
        pos += BLOCK
        header = reader.header(block, pos)
        if header is not None:
            return header
        if reader.pending:
            payload = data[pos:pos + reader.pending]
            if len(payload) != reader.pending:
                raise FormatError("invalid layer tar: truncated extended header")
            pos += reader.pending
            reader.extended(payload)
    return None


class HeaderFeed:
    """The tar stream pushed in chunks of any size (`feed`), its entries kept in `entries`.

    State between chunks: `_skip` bytes of file data still to pass over, and `_buf` holding a
    partial header block or extended payload (`_payload`: the next complete piece is one)."""

    def __init__(self) -> None:
        self.entries: list[TarHeader] = []
        self.pos = 0                 # bytes of the stream seen so far
        self.end_marker: int | None = None   # where the two end-of-archive blocks end, once seen
        self.reader = HeaderReader()
        self._skip = 0
        self._padding = 0            # how much of `_skip` is padding after the data (may be missing)
        self._buf = bytearray()
        self._want = BLOCK           # bytes `_buf` must reach before they are decoded
        self._payload = False

    @property
    def done(self) -> bool:
        """The end-of-archive marker was seen."""
        return self.reader.ended

    @property
    def archive_size(self) -> int:
        """Where Go's reader stops: just after the end-of-archive blocks (padding after them is not
        read), or the end of the stream when it has none. The zTOC's uncompressed archive size."""
        return self.end_marker if self.end_marker is not None else self.pos

    def feed(self, chunk: memoryview | bytes) -> None:
        """Decode what `chunk` completes. Runs once per block of headers, so its state lives in
        locals while it runs."""
        n = len(chunk)
        i = 0
        reader = self.reader
        header_of = reader.header
        append = self.entries.append
        skip, buf, want, payload, base = self._skip, self._buf, self._want, self._payload, self.pos
        try:
            while i < n:
                if skip:
                    step = skip if skip < n - i else n - i
                    skip -= step
                    i += step
                    continue
                if reader.ended:   # anything after the end marker is padding (Go does not read it)
                    break
                need = want - len(buf)
                if not buf and n - i >= need:
                    piece = bytes(chunk[i:i + need])   # the common case: the whole block is in this chunk
                    i += need
                else:
                    take = need if need < n - i else n - i
                    buf += chunk[i:i + take]
                    i += take
                    if len(buf) < want:
                        continue
                    piece, buf = bytes(buf), bytearray()
                if payload:
                    payload, want = False, BLOCK
                    reader.extended(piece)
                    continue
                header = header_of(piece, base + i)
                if header is None:
                    if reader.pending:
                        payload, want = True, reader.pending
                    elif reader.ended:
                        self.end_marker = base + i
                    continue
                append(header)
                skip = reader.data_length
                if skip:
                    self._padding = skip - header.size
        finally:
            self._skip, self._buf, self._want, self._payload = skip, buf, want, payload
        self.pos = base + n

    def finish(self) -> list[TarHeader]:
        """The entries; FormatError if the stream stopped inside an entry (not just in the padding
        after its data: Go reads that as the end)."""
        if self._skip > self._padding or self._buf or self._payload:
            raise FormatError(f"tar stream truncated at offset {self.pos} (inside an entry)")
        return self.entries
