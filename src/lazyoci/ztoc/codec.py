"""FlatBuffers encoding of the zTOC (schema.fbs) and TarZinfo (zinfo.fbs), and bounds-checked reads.

The zTOC is written by hand, front to back with fixed table layouts (any
layout that follows the vtables is valid FlatBuffers; flatc and the tests
read it): the `flatbuffers` Builder costs ~150 us per file. The tiny TarZinfo
uses the Builder. Reading is offset arithmetic over the bytes, because the
Python runtime trusts its input (a hostile offset raises IndexError deep
inside, or reads garbage): every read here checks its bounds and reports
FormatError.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import flatbuffers

from lazyoci.errors import FormatError
from lazyoci.ztoc.toc import TarEntry, format_rfc3339_nano

ZTOC_VERSION = "0.9"
GZIP, UNCOMPRESSED = 1, 2          # enum CompressionAlgorithm
TAR_ZINFO_VERSION = 2

# field slots, in declaration order (schema.fbs)
ZTOC_VERSION_F, ZTOC_TOOL, ZTOC_CSIZE, ZTOC_USIZE, ZTOC_TOC, ZTOC_CINFO = range(6)
(FM_NAME, FM_TYPE, FM_OFFSET, FM_SIZE, FM_LINKNAME, FM_MODE, FM_UID, FM_GID, FM_UNAME, FM_GNAME,
 FM_MODTIME, FM_DEVMAJOR, FM_DEVMINOR, FM_XATTRS) = range(14)
CI_ALGO, CI_MAXSPAN, CI_DIGESTS, CI_CHECKPOINTS = range(4)

_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_i32 = struct.Struct("<i").unpack_from
_i64 = struct.Struct("<q").unpack_from
_u8 = struct.Struct("<B").unpack_from
_i8 = struct.Struct("<b").unpack_from


# Our own fixed table layouts (any layout is valid FlatBuffers; readers follow the vtables).
# One vtable is shared by every FileMetadata table, strings that repeat are written once.
_ZTOC = struct.Struct("<iIIIIiqq")          # soffset, version, tool, toc, cinfo, pad, csize, usize
_ZTOC_VT = (4, 8, 24, 32, 12, 16)
_CINFO = struct.Struct("<ib3xiII")          # soffset, algorithm, pad, max_span_id, digests, checkpoints
_CINFO_VT = (4, 8, 12, 16)
_TOC = struct.Struct("<iI")
_FM = struct.Struct("<iIIIqqqqqIIIIII")     # see _FM_VT for the field order
_FM_VT = (4, 8, 16, 24, 12, 32, 56, 60, 64, 68, 72, 40, 48, 76)
_XATTR = struct.Struct("<iII")
_U32 = struct.Struct("<I")
_PAD = (b"\0\0\0\0", b"\0\0\0", b"\0\0", b"\0")   # NUL terminator + padding to 4, by len % 4


class _Writer:
    """Appends FlatBuffers objects front to back; references always point forward."""

    def __init__(self) -> None:
        self.out = bytearray(8)     # the root offset goes at 0
        self._cache: dict[bytes | str, int] = {}

    def align(self, n: int) -> None:
        self.out += bytes(-len(self.out) % n)

    def vtable(self, objlen: int, offsets: Sequence[int]) -> int:
        self.align(2)
        pos = len(self.out)
        self.out += struct.pack(f"<{2 + len(offsets)}H", 4 + 2 * len(offsets), objlen, *offsets)
        return pos

    def reserve(self, size: int, align: int = 8) -> int:
        self.align(align)
        pos = len(self.out)
        self.out += bytes(size)
        return pos

    def string(self, data: bytes | str, cache: bool = False) -> int:
        """A NUL-terminated, length-prefixed string; cached ones are written once and shared."""
        if cache:
            pos = self._cache.get(data)
            if pos is not None:
                return pos
        raw = data.encode() if isinstance(data, str) else data
        out = self.out
        if len(out) & 3:
            out += bytes(-len(out) % 4)
        pos = len(out)
        n = len(raw)
        out += _U32.pack(n) + raw + _PAD[n & 3]
        if cache:
            self._cache[data] = pos
        return pos

    def ref(self, field_pos: int, target: int) -> None:
        _U32.pack_into(self.out, field_pos, target - field_pos)

    def ref_vector(self, n: int) -> int:
        """A vector of n references (filled with `ref` later); returns the first slot's position."""
        self.align(4)
        self.out += _U32.pack(n)
        pos = len(self.out)
        self.out += bytes(4 * n)
        return pos


def _pax_vector(w: _Writer, vt: int, pax: Sequence[tuple[bytes, bytes]]) -> int:
    vec = w.ref_vector(len(pax))
    tables = []
    for k in range(len(pax)):
        pos = w.reserve(12, 4)
        _XATTR.pack_into(w.out, pos, pos - vt, 0, 0)
        tables.append(pos)
        w.ref(vec + 4 * k, pos)
    for pos, (key, value) in zip(tables, pax):
        w.ref(pos + 4, w.string(key))
        w.ref(pos + 8, w.string(value))
    return vec - 4


def encode_ztoc(*, build_tool: str, compressed_size: int, uncompressed_size: int,
                entries: Sequence[TarEntry], algorithm: int, span_digests: Sequence[str],
                checkpoints: bytes) -> bytes:
    """The zTOC FlatBuffer (version 0.9). Written by hand rather than with flatbuffers.Builder,
    which costs ~150 us per entry: 15 s for a 100,000-file layer."""
    w = _Writer()
    vt_ztoc = w.vtable(_ZTOC.size, _ZTOC_VT)
    vt_cinfo = w.vtable(_CINFO.size, _CINFO_VT)
    vt_toc = w.vtable(_TOC.size, (4,))
    vt_fm = w.vtable(_FM.size, _FM_VT)
    vt_fm_nox = w.vtable(_FM.size, _FM_VT[:-1] + (0,))
    vt_xattr = w.vtable(_XATTR.size, (4, 8))
    ztoc = w.reserve(_ZTOC.size)
    cinfo = w.reserve(_CINFO.size)
    toc = w.reserve(_TOC.size)
    _U32.pack_into(w.out, 0, ztoc)
    metadata = w.ref_vector(len(entries))
    _TOC.pack_into(w.out, toc, toc - vt_toc, metadata - 4 - (toc + 4))
    first = w.reserve(_FM.size * len(entries))
    out, string, cached = w.out, w.string, w._cache.get
    times: dict[int, str] = {}
    for i, e in enumerate(entries):
        t = first + i * _FM.size
        _U32.pack_into(out, metadata + 4 * i, t - (metadata + 4 * i))
        mod_time = times.get(e.mtime_ns)
        if mod_time is None:
            mod_time = times[e.mtime_ns] = format_rfc3339_nano(e.mtime_ns)
        # strings that repeat (type, owner names, times, empty link names) are shared;
        # the cache lookups are inlined because this loop runs once per file
        name = string(e.name) - t
        typ = (cached(e.type) or string(e.type, True)) - t
        linkname = (cached(e.linkname) or string(e.linkname, True)) - t
        uname = (cached(e.uname) or string(e.uname, True)) - t
        gname = (cached(e.gname) or string(e.gname, True)) - t
        mod_time_at = (cached(mod_time) or string(mod_time, True)) - t
        xvec = _pax_vector(w, vt_xattr, e.pax) if e.pax else 0
        _FM.pack_into(out, t, t - (vt_fm if xvec else vt_fm_nox), name - 4, typ - 8, linkname - 12,
                      e.offset, e.size, e.mode, e.devmajor, e.devminor,
                      e.uid & 0xFFFFFFFF, e.gid & 0xFFFFFFFF,
                      uname - 64, gname - 68, mod_time_at - 72, (xvec - t - 76) if xvec else 0)
    digests = w.ref_vector(len(span_digests))
    for k, d in enumerate(span_digests):
        w.ref(digests + 4 * k, w.string(d))
    w.align(4)
    blob = len(w.out)
    w.out += _U32.pack(len(checkpoints))
    w.out += checkpoints
    version, tool = w.string(ZTOC_VERSION), w.string(build_tool)
    _CINFO.pack_into(w.out, cinfo, cinfo - vt_cinfo, algorithm, len(span_digests) - 1,
                     digests - 4 - (cinfo + 12), blob - (cinfo + 16))
    _ZTOC.pack_into(w.out, ztoc, ztoc - vt_ztoc, version - (ztoc + 4), tool - (ztoc + 8),
                    toc - (ztoc + 12), cinfo - (ztoc + 16), 0, compressed_size, uncompressed_size)
    w.align(8)
    return bytes(w.out)


def encode_tar_zinfo(span_size: int, size: int) -> bytes:
    """The zinfo.TarZinfo FlatBuffer of an uncompressed layer."""
    b = flatbuffers.Builder(64)
    b.StartObject(3)
    b.PrependInt32Slot(0, TAR_ZINFO_VERSION, 0)
    b.PrependInt64Slot(1, span_size, 0)
    b.PrependInt64Slot(2, size, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


class FlatReader:
    """Bounds-checked FlatBuffers reads over one buffer; `what` names it in errors."""

    def __init__(self, buf: bytes | memoryview, what: str) -> None:
        self.buf = buf
        self.n = len(buf)
        self.what = what

    def bad(self, detail: str) -> FormatError:
        return FormatError(f"{self.what} is not a valid FlatBuffer: {detail}")

    def root(self) -> int:
        if self.n < 8:
            raise self.bad(f"{self.n} bytes")
        return self.table(_u32(self.buf, 0)[0])

    def table(self, pos: int) -> int:
        """Checks the table at `pos` and its vtable; returns pos."""
        if not 0 <= pos <= self.n - 4:
            raise self.bad(f"table offset {pos} outside the buffer")
        vt = pos - _i32(self.buf, pos)[0]
        if not 0 <= vt <= self.n - 4:
            raise self.bad(f"vtable offset {vt} outside the buffer")
        vtlen, objlen = _u16(self.buf, vt)[0], _u16(self.buf, vt + 2)[0]
        if vtlen < 4 or vtlen & 1 or vt + vtlen > self.n or pos + objlen > self.n or objlen < 4:
            raise self.bad(f"malformed vtable at {vt}")
        return pos

    def field(self, table: int, slot: int, size: int) -> int:
        """Absolute position of a field of `size` bytes, or 0 when absent (default)."""
        buf = self.buf
        vt = table - _i32(buf, table)[0]
        o = 4 + 2 * slot
        if o >= _u16(buf, vt)[0]:
            return 0
        off = _u16(buf, vt + o)[0]
        if not off:
            return 0
        if off + size > _u16(buf, vt + 2)[0]:
            raise self.bad(f"field {slot} of the table at {table} lies outside it")
        return table + off

    def deref(self, pos: int) -> int:
        target = pos + _u32(self.buf, pos)[0]
        if target > self.n - 4:
            raise self.bad(f"reference at {pos} points outside the buffer")
        return target

    def int_field(self, table: int, slot: int, fmt: str = "q", default: int = 0) -> int:
        unpack = {"q": _i64, "i": _i32, "I": _u32, "b": _i8, "B": _u8}[fmt]
        pos = self.field(table, slot, struct.calcsize(fmt))
        return unpack(self.buf, pos)[0] if pos else default

    def bytes_field(self, table: int, slot: int) -> bytes:
        """A string field's raw bytes (b"" when absent)."""
        pos = self.field(table, slot, 4)
        if not pos:
            return b""
        start, n = self.vector(self.deref(pos), 1)
        return bytes(self.buf[start:start + n])

    def vector(self, vec: int, elem: int) -> tuple[int, int]:
        """(first element position, length) of the vector at `vec`."""
        n = _u32(self.buf, vec)[0]
        if vec + 4 + n * elem > self.n:
            raise self.bad(f"vector at {vec} of {n} elements runs past the end")
        return vec + 4, n

    def vector_field(self, table: int, slot: int, elem: int) -> tuple[int, int]:
        pos = self.field(table, slot, 4)
        if not pos:
            return 0, 0
        return self.vector(self.deref(pos), elem)


_RAW_TAR_ZINFO = struct.Struct("<iqq")


def decode_tar_zinfo(blob: bytes | memoryview) -> tuple[int, int]:
    """(span_size, size) of a TarZinfo; FormatError when malformed.

    The format's form is a FlatBuffers table; some reference releases wrote the
    same three fields packed (20 bytes), which no FlatBuffer of it can be."""
    if len(blob) == _RAW_TAR_ZINFO.size:
        version, span_size, size = _RAW_TAR_ZINFO.unpack_from(blob)
    else:
        r = FlatReader(blob, "TarZinfo checkpoint data")
        t = r.root()
        version = r.int_field(t, 0, "i")
        span_size, size = r.int_field(t, 1), r.int_field(t, 2)
    if version != TAR_ZINFO_VERSION:
        raise FormatError(f"TarZinfo version {version} is not supported (want {TAR_ZINFO_VERSION})")
    if span_size <= 0 or size < 0:
        raise FormatError(f"TarZinfo has span size {span_size} and size {size}")
    return span_size, size
