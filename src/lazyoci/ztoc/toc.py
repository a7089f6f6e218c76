"""The TOC half of a zTOC: an incremental tar header parser.

It is fed the uncompressed tar stream in chunks of any size (straight from the
inflater's output buffer) and records, for every entry, where its data starts
in that stream. Only headers are looked at; file data is skipped, so the cost
is per entry, not per byte. Parsing follows Go's archive/tar (what the
reference snapshotter uses), so offsets and metadata agree with it:
ustar/GNU/v7 headers, PAX (per-entry and global), GNU long names (L/K),
base-256 numbers. Sparse files and unknown entry types are rejected.
"""

from __future__ import annotations

import datetime as _dt
import re
import struct
import zlib
from typing import NamedTuple

from lazyoci.errors import FormatError

BLOCK = 512

# tar typeflag -> zTOC type name (the only seven types a zTOC may hold)
TYPE_NAMES = {b"0": "reg", b"\0": "reg", b"1": "hardlink", b"2": "symlink", b"3": "char",
              b"4": "block", b"5": "dir", b"6": "fifo"}
_META = {b"x", b"g", b"L", b"K"}
_MAX_META = 16 << 20   # a PAX or long-name record larger than this is hostile, not a path
_ZERO_BLOCK = bytes(BLOCK)
_I64, _U32 = 1 << 63, (1 << 32) - 1   # what the zTOC's long and uint32 fields can hold


class TarEntry(NamedTuple):
    """One TOC entry as the builder records it (raw bytes, as in the tar)."""

    name: bytes
    type: str
    offset: int          # where the data starts in the uncompressed tar stream
    size: int            # the header's size field
    linkname: bytes
    mode: int
    uid: int
    gid: int
    uname: bytes
    gname: bytes
    mtime_ns: int
    devmajor: int
    devminor: int
    pax: tuple[tuple[bytes, bytes], ...]   # all PAX records (global then local), sorted by key


def _cstr(field: bytes) -> bytes:
    i = field.find(b"\0")
    return field if i < 0 else field[:i]


def _num(field: bytes, what: str, at: int) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit is set."""
    if field and field[0] & 0x80:
        value = int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        if field[0] & 0x40:   # negative base-256 (two's complement)
            value -= 1 << (8 * len(field) - 1)
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise FormatError(f"not a tar archive: bad {what} field {field!r} in header at offset {at}") from None


def _checksum_ok(block: bytes) -> bool:
    """The header checksum: the byte sum with the checksum field read as 8 spaces.

    adler32's low half is 1 + that sum mod 65521, computed in C; a sum off by a
    multiple of 65521 cannot be told apart, which is harmless for telling tar
    headers from other data. Old writers summed signed bytes: checked the slow way."""
    field = block[148:156]
    try:
        want = int(field.partition(b"\0")[0], 8)
    except ValueError:
        return False
    unsigned = (zlib.adler32(block) & 0xFFFF) - 1 - sum(field) + 256
    if (want - unsigned) % 65521 == 0:
        return True
    signed = sum(block) - sum(field) + 256 - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    return want == signed


_OCT_CACHE: dict[bytes, int] = {}   # mode/uid/mtime fields repeat across a layer's entries


def _oct(field: bytes, what: str, at: int) -> int:
    """The common case of _num (NUL-terminated octal) at C speed, memoised; the rest goes to _num."""
    v = _OCT_CACHE.get(field)
    if v is not None:
        return v
    try:
        v = int(field.partition(b"\0")[0] or b"0", 8)
    except ValueError:
        return _num(field, what, at)
    if len(_OCT_CACHE) < 8192:
        _OCT_CACHE[field] = v
    return v


# name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic+version, uname, gname,
# devmajor, devminor, prefix
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")


def parse_pax(data: bytes, at: int) -> list[tuple[bytes, bytes]]:
    """PAX records "<len> <key>=<value>\\n" as raw (key, value) byte pairs."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:   # NUL padding after the last record
            break
        sp = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:sp]) if sp > pos else -1
        except ValueError:
            length = -1
        rec = data[sp + 1:pos + length] if length > 0 else b""
        if length <= 0 or pos + length > len(data) or not rec.endswith(b"\n") or b"=" not in rec:
            raise FormatError(f"malformed PAX record in header at offset {at}")
        key, _, value = rec[:-1].partition(b"=")
        out.append((key, value))
        pos += length
    return out


def parse_pax_time(value: bytes, at: int) -> int:
    """A PAX time "[-]sec[.frac]" in nanoseconds (fraction truncated to 9 digits, as Go does)."""
    m = re.fullmatch(rb"(-?)(\d+)(?:\.(\d*))?", value)
    if not m:
        raise FormatError(f"bad PAX mtime {value!r} in header at offset {at}")
    ns = int(m.group(2)) * 1_000_000_000 + int(((m.group(3) or b"") + b"000000000")[:9])
    return -ns if m.group(1) else ns


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


def format_rfc3339_nano(mtime_ns: int) -> str:
    """Go's time.RFC3339Nano in UTC: fraction without trailing zeros, omitted when zero."""
    sec, ns = divmod(mtime_ns, 1_000_000_000)
    try:
        t = _EPOCH + _dt.timedelta(seconds=sec)
    except OverflowError:
        return ""   # Go's MarshalText fails for such years; the reference then writes ""
    frac = f".{ns:09d}".rstrip("0") if ns else ""
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}{frac}Z"


_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")


def parse_rfc3339_nano(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time (any offset); FormatError if malformed."""
    m = _RFC3339.fullmatch(text)
    if not m:
        raise FormatError(f"bad mod_time {text!r} in zTOC (want RFC 3339)")
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    tz = m.group(8)
    if tz == "Z":
        offset = 0
    else:
        offset = (int(tz[1:3]) * 60 + int(tz[4:6])) * 60 * (1 if tz[0] == "+" else -1)
    try:
        t = _dt.datetime(y, mo, d, h, mi, s, tzinfo=_dt.timezone.utc)
    except ValueError:
        raise FormatError(f"bad mod_time {text!r} in zTOC") from None
    sec = int((t - _EPOCH).total_seconds()) - offset
    return sec * 1_000_000_000 + int(((m.group(7) or "") + "000000000")[:9])


class TocBuilder:
    """Feed it the tar stream with `feed`, then call `finish` for the entries.

    State between chunks: `_skip` bytes of file data still to pass over, and
    `_buf` holding a partial header block or a PAX/long-name payload.
    """

    def __init__(self) -> None:
        self.entries: list[TarEntry] = []
        self.pos = 0                 # bytes of the stream seen so far
        self._skip = 0
        self._buf = bytearray()
        self._want = BLOCK           # bytes `_buf` must reach before `_handle` runs
        self._meta: tuple[bytes, int, int] | None = None   # (typeflag, header offset, padded size)
        self._global: dict[bytes, bytes] = {}
        self._local: dict[bytes, bytes] = {}
        self._longname: bytes | None = None
        self._longlink: bytes | None = None
        self._zero_blocks = 0
        self.done = False            # the end-of-archive marker was seen

    def feed(self, chunk: memoryview | bytes) -> None:
        n = len(chunk)
        i = 0
        while i < n:
            if self.done:   # anything after the end marker is padding (Go ignores it too)
                break
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            need = self._want - len(self._buf)
            if not self._buf and n - i >= need:
                piece = bytes(chunk[i:i + need])   # the common case: the whole block is in this chunk
                i += need
            else:
                take = min(need, n - i)
                self._buf += chunk[i:i + take]
                i += take
                if len(self._buf) < self._want:
                    continue
                piece, self._buf = bytes(self._buf), bytearray()
            self._handle(piece, self.pos + i)
        self.pos += n

    def _handle(self, data: bytes, end: int) -> None:
        """A complete header block, or a complete metadata payload, ending at stream offset `end`.

        This runs once per tar entry, so it is written for speed: one unpack of the
        header, memoised octal fields, no helper calls on the common path."""
        if self._meta is not None:
            flag, at, size = self._meta
            self._meta = None
            self._want = BLOCK
            self._apply_meta(flag, data[:size], at)
            return
        at = end - BLOCK
        if data == _ZERO_BLOCK:
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self.done = True
            return
        if self._zero_blocks:
            raise FormatError(f"not a tar archive: data after an end-of-archive block at offset {at}")
        (name, mode, uid, gid, size, mtime, chksum, flag, linkname, magic, uname, gname,
         devmajor, devminor, prefix) = _HEADER.unpack(data)
        if not _checksum_ok(data):
            raise FormatError(f"not a tar archive: bad header checksum at offset {at}")
        cache = _OCT_CACHE
        size = cache[size] if size in cache else _oct(size, "size", at)
        if size < 0:
            raise FormatError(f"negative size in tar header at offset {at}")
        kind = TYPE_NAMES.get(flag)
        if kind is None:
            if flag in _META:
                if size > _MAX_META:
                    raise FormatError(f"tar metadata record of {size} bytes at offset {at} is too large")
                padded = -(-size // BLOCK) * BLOCK
                if padded:
                    self._meta = (flag, at, size)
                    self._want = padded
                else:
                    self._apply_meta(flag, b"", at)
                return
            if flag == b"S":
                raise FormatError(f"sparse files are not supported (GNU sparse entry at offset {at})")
            raise FormatError(f"unsupported tar entry type {flag.decode(errors='replace')!r} at offset {at}")
        name = name.partition(b"\0")[0]
        if magic[:6] == b"ustar\0":
            prefix = prefix.partition(b"\0")[0]
            if prefix:
                name = prefix + b"/" + name
        if flag == b"\0" and name.endswith(b"/"):
            kind = "dir"   # old v7 archives mark directories only by the slash
        mode = cache[mode] if mode in cache else _oct(mode, "mode", at)
        uid = cache[uid] if uid in cache else _oct(uid, "uid", at)
        gid = cache[gid] if gid in cache else _oct(gid, "gid", at)
        mtime_ns = (cache[mtime] if mtime in cache else _oct(mtime, "mtime", at)) * 1_000_000_000
        if magic[:5] == b"ustar":
            devmajor = cache[devmajor] if devmajor in cache else _oct(devmajor, "devmajor", at)
            devminor = cache[devminor] if devminor in cache else _oct(devminor, "devminor", at)
        else:
            devmajor = devminor = 0
        linkname = linkname.partition(b"\0")[0]
        uname, gname = uname.partition(b"\0")[0], gname.partition(b"\0")[0]
        if self._longname is not None:
            name, self._longname = self._longname, None
        if self._longlink is not None:
            linkname, self._longlink = self._longlink, None
        pax: tuple[tuple[bytes, bytes], ...] = ()
        if self._global or self._local:
            records = dict(self._global)
            records.update(self._local)
            self._local = {}
            name = records.get(b"path", name)
            linkname = records.get(b"linkpath", linkname)
            uname = records.get(b"uname", uname)
            gname = records.get(b"gname", gname)
            try:
                if b"size" in records:
                    size = int(records[b"size"])
                if b"uid" in records:
                    uid = int(records[b"uid"])
                if b"gid" in records:
                    gid = int(records[b"gid"])
            except ValueError:
                raise FormatError(f"bad numeric PAX record for the entry at offset {at}") from None
            if b"mtime" in records:
                mtime_ns = parse_pax_time(records[b"mtime"], at)
            pax = tuple(sorted(records.items()))
        if not (0 <= size < _I64 and -_I64 <= mode < _I64 and 0 <= uid <= _U32 and 0 <= gid <= _U32
                and -_I64 <= devmajor < _I64 and -_I64 <= devminor < _I64):
            raise FormatError(f"tar header at offset {at} has a size, mode, uid, gid or device number "
                              f"out of range")
        self.entries.append(TarEntry(name, kind, end, size, linkname, mode, uid, gid, uname, gname,
                                     mtime_ns, devmajor, devminor, pax))
        if kind == "reg":   # every other type is header-only, whatever its size field says
            self._skip = -(-size // BLOCK) * BLOCK

    def _apply_meta(self, flag: bytes, payload: bytes, at: int) -> None:
        if flag == b"L":
            self._longname = _cstr(payload)
        elif flag == b"K":
            self._longlink = _cstr(payload)
        else:
            records = parse_pax(payload, at)
            target = self._global if flag == b"g" else self._local
            for k, v in records:
                if k.startswith(b"GNU.sparse."):
                    raise FormatError(f"sparse files are not supported (PAX {k.decode(errors='replace')} at offset {at})")
                target[k] = v

    def finish(self) -> list[TarEntry]:
        """The entries; FormatError if the stream stopped inside an entry."""
        if self._skip or self._buf or self._meta is not None:
            raise FormatError(f"tar stream truncated at offset {self.pos} (inside an entry)")
        return self.entries
