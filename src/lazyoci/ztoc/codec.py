"""FlatBuffers encoding of the zTOC (schema.fbs) and TarZinfo (zinfo.fbs), and bounds-checked reads.

Writing uses the `flatbuffers` Builder. Reading is done here with offset
arithmetic over the bytes, because the Python runtime trusts its input (a
hostile offset raises IndexError deep inside, or reads garbage): every read
below checks its bounds and reports FormatError.
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


def _offset_vector(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _entry(b: flatbuffers.Builder, e: TarEntry) -> int:
    name = b.CreateString(e.name)
    typ = b.CreateString(e.type)
    linkname = b.CreateString(e.linkname)
    uname = b.CreateString(e.uname)
    gname = b.CreateString(e.gname)
    mod_time = b.CreateString(format_rfc3339_nano(e.mtime_ns))
    xattrs = []
    for key, value in e.pax:
        k, v = b.CreateString(key), b.CreateString(value)
        b.StartObject(2)
        b.PrependUOffsetTRelativeSlot(0, k, 0)
        b.PrependUOffsetTRelativeSlot(1, v, 0)
        xattrs.append(b.EndObject())
    xvec = _offset_vector(b, xattrs) if xattrs else 0
    b.StartObject(14)
    b.PrependUOffsetTRelativeSlot(FM_NAME, name, 0)
    b.PrependUOffsetTRelativeSlot(FM_TYPE, typ, 0)
    b.PrependInt64Slot(FM_OFFSET, e.offset, 0)
    b.PrependInt64Slot(FM_SIZE, e.size, 0)
    b.PrependUOffsetTRelativeSlot(FM_LINKNAME, linkname, 0)
    b.PrependInt64Slot(FM_MODE, e.mode, 0)
    b.PrependUint32Slot(FM_UID, e.uid & 0xFFFFFFFF, 0)
    b.PrependUint32Slot(FM_GID, e.gid & 0xFFFFFFFF, 0)
    b.PrependUOffsetTRelativeSlot(FM_UNAME, uname, 0)
    b.PrependUOffsetTRelativeSlot(FM_GNAME, gname, 0)
    b.PrependUOffsetTRelativeSlot(FM_MODTIME, mod_time, 0)
    b.PrependInt64Slot(FM_DEVMAJOR, e.devmajor, 0)
    b.PrependInt64Slot(FM_DEVMINOR, e.devminor, 0)
    if xvec:
        b.PrependUOffsetTRelativeSlot(FM_XATTRS, xvec, 0)
    return b.EndObject()


def encode_ztoc(*, build_tool: str, compressed_size: int, uncompressed_size: int,
                entries: Sequence[TarEntry], algorithm: int, span_digests: Sequence[str],
                checkpoints: bytes) -> bytes:
    """The zTOC FlatBuffer (version 0.9)."""
    b = flatbuffers.Builder(1024 + len(checkpoints) + 256 * len(entries))
    blob = b.CreateByteVector(checkpoints)
    digests = _offset_vector(b, [b.CreateString(d) for d in span_digests])
    b.StartObject(4)
    b.PrependInt8Slot(CI_ALGO, algorithm, GZIP)
    b.PrependInt32Slot(CI_MAXSPAN, len(span_digests) - 1, 0)
    b.PrependUOffsetTRelativeSlot(CI_DIGESTS, digests, 0)
    b.PrependUOffsetTRelativeSlot(CI_CHECKPOINTS, blob, 0)
    cinfo = b.EndObject()
    metadata = _offset_vector(b, [_entry(b, e) for e in entries])
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, metadata, 0)
    toc = b.EndObject()
    version = b.CreateString(ZTOC_VERSION)
    tool = b.CreateString(build_tool)
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(ZTOC_VERSION_F, version, 0)
    b.PrependUOffsetTRelativeSlot(ZTOC_TOOL, tool, 0)
    b.PrependInt64Slot(ZTOC_CSIZE, compressed_size, 0)
    b.PrependInt64Slot(ZTOC_USIZE, uncompressed_size, 0)
    b.PrependUOffsetTRelativeSlot(ZTOC_TOC, toc, 0)
    b.PrependUOffsetTRelativeSlot(ZTOC_CINFO, cinfo, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


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


def decode_tar_zinfo(blob: bytes | memoryview) -> tuple[int, int]:
    """(span_size, size) of a TarZinfo buffer; FormatError when malformed."""
    r = FlatReader(blob, "TarZinfo checkpoint data")
    t = r.root()
    version = r.int_field(t, 0, "i")
    span_size, size = r.int_field(t, 1), r.int_field(t, 2)
    if version != TAR_ZINFO_VERSION:
        raise FormatError(f"TarZinfo version {version} is not supported (want {TAR_ZINFO_VERSION})")
    if span_size <= 0 or size < 0:
        raise FormatError(f"TarZinfo has span size {span_size} and size {size}")
    return span_size, size
