"""Ztoc: a validated, zero-copy view over zTOC bytes (written by lazyoci or by the reference).

The lazy-loading service keeps zTOCs of 100,000+ files in memory, so a Ztoc
holds only the bytes plus a few compact arrays (span offsets; 21 bytes per entry
for its extent, type and where its name starts, which lookups read); entries are
decoded when asked for. `parse` checks everything a hostile zTOC could use to
make a reader misbehave: FlatBuffer bounds, entry offsets beyond the archive,
overlapping entries, span counts that disagree with the checkpoints, and a
checkpoint blob that is neither zinfo v1 nor v2; and the caps of ztoc/limits.py
(span sizes, zTOC size, entry count, names the kernel could not create).

A Ztoc is the layer index the lazy filesystem serves from (fs/layer_index.py
`LayerIndex`): everything the filesystem knows of the zTOC's layout is here.
"""

from __future__ import annotations

import hashlib
import re
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import NamedTuple

from lazyoci.errors import FormatError
from lazyoci.ztoc import codec as C
from lazyoci.ztoc import limits
from lazyoci.ztoc import spans as _spans
from lazyoci.ztoc.spans import SpanReceiver
from lazyoci.ztoc.toc import BLOCK, parse_rfc3339_nano
from lazyoci.ztoc.zinfo import GzipCheckpoints

ENTRY_TYPES = frozenset({"hardlink", "symlink", "dir", "reg", "char", "block", "fifo"})
SUPPORTED_VERSIONS = frozenset({"0.9"})
XATTR_PREFIX = "SCHILY.xattr."
_DIGEST = re.compile(rb"sha256:[0-9a-f]{64}")
_TYPE_ORDER = tuple(sorted(ENTRY_TYPES))
_TYPE_CODES = {t.encode(): code for code, t in enumerate(_TYPE_ORDER)}   # type as stored -> its code
_FIELD_SIZE = (4, 4, 8, 8, 4, 8, 4, 4, 4, 4, 4, 8, 8, 4)   # bytes of each FileMetadata slot
_FIELD_FMT = ("I", "I", "q", "q", "I", "q", "I", "I", "I", "I", "I", "q", "q", "I")
_REF_SLOTS = frozenset((C.FM_NAME, C.FM_TYPE, C.FM_LINKNAME, C.FM_UNAME, C.FM_GNAME, C.FM_MODTIME, C.FM_XATTRS))
_DEFAULTS = (b"", b"", 0, 0, b"", 0, 0, 0, b"", b"", b"", 0, 0, 0)
_NAME_BATCH = 4096     # names checked at once (and held meanwhile) by _validate_entries


_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from
_I64 = struct.Struct("<q").unpack_from


class EntryColumns(NamedTuple):
    """What checking a zTOC's entries derives from them (`Ztoc._validate_entries`): a parse in a
    helper process hands these back with the bytes' digest (service/index_parsing.py), so that
    the service's own parse of the same verified bytes skips the loop over every entry."""

    types: bytearray           # every entry's type, as its position in _TYPE_ORDER
    names: array               # where every entry's name string starts (0: it has none)
    extents: array             # offset and size of every entry
    vtables: tuple[int, ...]   # where the entries' vtables are (a few: their plans are made again)


class _Plan(NamedTuple):
    """How to read every FileMetadata table that uses one vtable."""

    objlen: int
    unpack: Callable[..., tuple]   # one struct unpack_from of all present fields, in offset order
    arrange: Callable[..., tuple]  # (unpacked + _DEFAULTS) -> the 14 values in slot order
    refs: tuple[tuple[int, int], ...]   # (slot, field offset) of the references present
    name_at: int       # field offsets of the name and the link target (0: absent)
    link_at: int
    # for `_validate_entries`, which reads the unpacked values as they come (no `arrange`):
    checks: tuple[tuple[int, int], ...]   # (position among them, field offset) of every reference
    strings: Callable[..., tuple]    # [b"", the references' strings...] -> (name, type, link target)
    name_k: int        # positions of the name, the data offset and size among them (-1: absent)
    offset_k: int
    size_k: int


def _string(buf: bytes, t: int, at: int) -> bytes:
    """The string field at offset `at` of the table at `t` (b"" when absent); its bounds were
    checked when the zTOC was parsed."""
    if not at:
        return b""
    p = t + at
    p += _U32(buf, p)[0]
    return buf[p + 4:p + 4 + _U32(buf, p)[0]]


def _text(raw: bytes) -> str:
    """Names are bytes in tar; surrogateescape keeps non-UTF-8 names round-trippable (os.fsencode)."""
    return raw.decode("utf-8", "surrogateescape")


class TocEntry(NamedTuple):
    """One file of the layer, decoded on demand from the zTOC."""

    name: str
    type: str
    offset: int          # data start in the uncompressed tar stream
    size: int
    linkname: str
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    mod_time: str        # RFC 3339 with nanoseconds, as stored
    mtime_ns: int
    devmajor: int
    devminor: int
    pax: dict[str, str]          # every PAX record of the entry
    xattrs: dict[str, bytes]     # PAX SCHILY.xattr.* records, prefix stripped, raw values


class Ztoc:
    """Parse with `Ztoc.parse(data)`; see the module docstring."""

    version: str
    build_tool: str
    compressed_size: int
    uncompressed_size: int
    compression: str
    span_size: int
    num_spans: int
    # made by `parse` (through cls.__new__: a Ztoc exists only parsed)
    _data: bytes
    _digest: str | None
    _times: dict[str, int]
    _r: C.FlatReader
    _points: GzipCheckpoints | None
    _entries_start: int
    _count: int
    _digests_start: int
    _plans: dict[int, _Plan]
    _types: bytearray          # every entry's type, as its position in _TYPE_ORDER
    _names: array              # where every entry's name string starts (0: it has none)
    _pax_plans: dict[int, tuple[int, int, int]]
    _xattrs_anywhere: bool

    @classmethod
    def parse(cls, data: bytes, digest: str | None = None, columns: EntryColumns | None = None) -> "Ztoc":
        """Parse and check zTOC bytes; `digest` is theirs if the caller verified it already
        (otherwise it is computed when first asked for). `columns`: what a parse of the same
        verified bytes derived from their entries (`entry_columns`); their check is not repeated."""
        limits.MAX_ZTOC_BYTES.check(len(data), "the zTOC")
        self = cls.__new__(cls)
        self._data = bytes(data)
        self._digest = digest
        self._times = {}   # mod_time text -> ns; layers repeat a few times a lot
        self._r = r = C.FlatReader(self._data, "zTOC")
        try:
            self._parse(r, columns)
        except (struct.error, IndexError, OverflowError) as exc:   # a read ran off the buffer
            raise r.bad(str(exc)) from None
        return self

    def entry_columns(self) -> EntryColumns:
        return EntryColumns(self._types, self._names, self._extents, tuple(self._plans))

    def _take_columns(self, columns: EntryColumns) -> None:
        count = self._count
        if len(columns.types) != count or len(columns.names) != count or len(columns.extents) != 2 * count:
            raise FormatError(f"the entry columns handed over do not fit the zTOC's {count} entries")
        self._plans = {}
        self._pax_plans = {}
        for vt in columns.vtables:
            self._plan(vt)
        self._types, self._names, self._extents = columns.types, columns.names, columns.extents

    def _parse(self, r: C.FlatReader, columns: EntryColumns | None = None) -> None:
        root = r.root()
        self.version = _text(r.bytes_field(root, C.ZTOC_VERSION_F))
        if self.version not in SUPPORTED_VERSIONS:
            raise FormatError(f"zTOC version {self.version!r} is not supported (want 0.9)")
        self.build_tool = _text(r.bytes_field(root, C.ZTOC_TOOL))
        self.compressed_size = r.int_field(root, C.ZTOC_CSIZE)
        self.uncompressed_size = r.int_field(root, C.ZTOC_USIZE)
        if self.compressed_size <= 0 or self.uncompressed_size < 0:
            raise FormatError(f"zTOC archive sizes {self.compressed_size}/{self.uncompressed_size} are not valid")
        toc_pos = r.field(root, C.ZTOC_TOC, 4)
        cinfo_pos = r.field(root, C.ZTOC_CINFO, 4)
        if not toc_pos or not cinfo_pos:
            raise FormatError("zTOC lacks its TOC or its compression info")
        self._spans(r, r.table(r.deref(cinfo_pos)))
        self._entries_start, self._count = r.vector_field(r.table(r.deref(toc_pos)), 0, 4)
        # PAX records are decoded only if one may be an xattr: most zTOCs have none, while some
        # writers give every entry a record (Python's tarfile an `mtime` with a fraction)
        self._xattrs_anywhere = XATTR_PREFIX.encode() in self._data
        if columns is None:
            self._validate_entries(r)
        else:
            self._take_columns(columns)

    def _spans(self, r: C.FlatReader, ci: int) -> None:
        algo = r.int_field(ci, C.CI_ALGO, "b", C.GZIP)
        max_span_id = r.int_field(ci, C.CI_MAXSPAN, "i")
        start, n = r.vector_field(ci, C.CI_CHECKPOINTS, 1)
        blob = memoryview(self._data)[start:start + n]
        self._points = None
        if algo == C.GZIP:
            self.compression = "gzip"
            self._points = GzipCheckpoints(blob, self.compressed_size)
            self.span_size = self._points.span_size
            self.num_spans = self._points.count
        elif algo == C.UNCOMPRESSED:
            self.compression = "none"
            self.span_size, size = C.decode_tar_zinfo(blob)
            if size != self.compressed_size:
                raise FormatError(f"TarZinfo size {size} differs from the layer size {self.compressed_size}")
            if self.uncompressed_size > size:
                raise FormatError(f"zTOC archive size {self.uncompressed_size} is over the layer size {size}")
            self.num_spans = -(-size // self.span_size)
        else:
            raise FormatError(f"zTOC compression algorithm {algo} is not supported")
        limits.MAX_SPANS.check(self.num_spans, "the zTOC's span count")
        if max_span_id != self.num_spans - 1:
            raise FormatError(f"zTOC max_span_id {max_span_id} does not match its {self.num_spans} spans")
        self._check_span_sizes()
        self._digests_start, ndigests = r.vector_field(ci, C.CI_DIGESTS, 4)
        if ndigests != self.num_spans:
            raise FormatError(f"zTOC has {ndigests} span digests for {self.num_spans} spans")
        for i in range(ndigests):
            if not _DIGEST.fullmatch(self._digest_bytes(i)):
                raise FormatError(f"zTOC span digest {i} is not a sha256 digest")

    def _check_span_sizes(self) -> None:
        """Every span, compressed and inflated, within the caps: a read fetches and inflates whole
        spans, so a span's size is the memory and the download one read can cost."""
        limits.MAX_SPAN_SIZE.check(self.span_size, "the zTOC's span size")
        if self._points is None:    # fixed slices of span_size: no span is larger
            return
        usize, csize = self.uncompressed_size, self.compressed_size
        outs, ins, bits = self._points.outs, self._points.ins, self._points.bits
        cap, last = limits.MAX_SPAN_BYTES.value, self.num_spans - 1
        for i in range(self.num_spans):
            u = min(outs[i + 1] if i < last else usize, usize) - min(outs[i], usize)
            c = (ins[i + 1] if i < last else csize) - (ins[i] - (1 if bits[i] else 0))
            if u > cap or c > cap:
                limits.MAX_SPAN_BYTES.check(max(u, c), f"zTOC span {i} ({u:,} bytes inflated, "
                                                        f"{c:,} compressed)")

    def _digest_bytes(self, i: int) -> bytes:
        r = self._r
        s, n = r.vector(r.deref(self._digests_start + 4 * i), 1)
        return self._data[s:s + n]

    def _plan(self, vt: int) -> _Plan:
        """How to read the FileMetadata tables of one vtable with a single unpack (checked, cached).
        Writers share vtables, so a zTOC has a handful of these however many files it lists."""
        plan = self._plans.get(vt)
        if plan is None:
            objlen, offs = self._vtable(vt, 14)
            fmt, order, at = "<4x", [], 4   # the table starts with its vtable offset
            for off, slot in sorted((off, slot) for slot, off in enumerate(offs) if off):
                size = _FIELD_SIZE[slot]
                if off < at or off + size > objlen:
                    raise self._r.bad(f"field {slot} of vtable {vt} overlaps another or lies outside its table")
                fmt += f"{off - at}x" * (off > at) + _FIELD_FMT[slot]
                order.append(slot)
                at = off + size
            # unpacked values + the defaults, picked into slot order by one itemgetter call
            picks = [order.index(slot) if offs[slot] else len(order) + slot for slot in range(14)]
            refs = tuple((slot, offs[slot]) for slot in sorted(_REF_SLOTS) if offs[slot])
            checks = tuple((order.index(slot), off) for slot, off in refs)
            cut = [slot for slot, _ in refs]     # the strings a check cuts out follow a b""
            strings = itemgetter(*(cut.index(slot) + 1 if offs[slot] else 0
                                   for slot in (C.FM_NAME, C.FM_TYPE, C.FM_LINKNAME)))
            plan = self._plans[vt] = _Plan(objlen, struct.Struct(fmt).unpack_from, itemgetter(*picks), refs,
                                           offs[C.FM_NAME], offs[C.FM_LINKNAME], checks,
                                           strings, *(order.index(slot) if offs[slot] else -1
                                                      for slot in (C.FM_NAME, C.FM_OFFSET, C.FM_SIZE)))
        return plan

    def _fields(self, i: int) -> list:
        """The 14 FileMetadata values of entry i (strings as raw bytes). Nothing here is checked
        again: `_validate_entries` checked every reference of an entry before anything asks."""
        buf = self._data
        ep = self._entries_start + 4 * i
        t = ep + _U32(buf, ep)[0]
        plan = self._plans[t - _I32(buf, t)[0]]
        vals = list(plan.arrange(plan.unpack(buf, t) + _DEFAULTS))
        for slot, off in plan.refs:   # references: resolve strings now, keep the vector position
            s = t + off + vals[slot]  # where the string or vector starts
            vals[slot] = s if slot == C.FM_XATTRS else buf[s + 4:s + 4 + _U32(buf, s)[0]]
        return vals

    def _validate_entries(self, r: C.FlatReader) -> None:
        """Every entry is well-formed and they tile the archive without overlapping.

        The loop that makes a mount wait for a big layer: each entry is one unpack of its table
        (`_Plan`) and one length read per reference, which cuts out the strings checked here."""
        usize = self.uncompressed_size
        limits.MAX_ENTRIES.check(self._count, "the zTOC's entry count")
        self._plans = {}
        self._pax_plans = {}
        extents = self._extents = array("q")    # offset and size of every entry, for entry_extent
        prev_end, ordered = 0, True
        names: list[bytes] = []    # names and link targets since entry `first`, checked in batches
        first = 0
        xattrs_anywhere = self._xattrs_anywhere
        buf, n, plans, ep = self._data, len(self._data), self._plans, self._entries_start
        types = self._types = bytearray()
        type_codes = _TYPE_CODES
        name_starts = self._names = array("I")   # (a zTOC is under 4 GiB: ztoc/limits.py)
        # the vector's bounds were checked when its position was read
        for i, u in enumerate(struct.unpack_from(f"<{self._count}I", buf, ep)):
            t = ep + 4 * i + u
            if t > n - 4:
                raise r.bad(f"entry {i} points outside the buffer")
            vt = t - _I32(buf, t)[0]
            plan = plans.get(vt) or self._plan(vt)
            if t + plan.objlen > n:
                raise r.bad(f"entry {i} runs past the end of the buffer")
            v = plan.unpack(buf, t)
            cut = [b""]
            for k, at in plan.checks:
                s = t + at + v[k]
                e = s + 4 + _U32(buf, s)[0] if s <= n - 4 else n + 1
                if e > n:
                    raise r.bad(f"a field of entry {i} runs past the end of the buffer")
                cut.append(buf[s + 4:e])
            name, typ, link = plan.strings(cut)
            off = v[plan.offset_k] if plan.offset_k >= 0 else 0
            size = v[plan.size_k] if plan.size_k >= 0 else 0
            code = type_codes.get(typ)
            if code is None:
                raise FormatError(f"zTOC entry {i} has type {typ.decode(errors='replace')!r} "
                                  f"(want one of {', '.join(_TYPE_ORDER)})")
            types.append(code)
            name_starts.append(t + plan.name_at + v[plan.name_k] if plan.name_at else 0)
            names.append(name)
            if plan.link_at:
                names.append(link)
            if len(names) >= _NAME_BATCH:
                self._check_names(first, i + 1, names)
                first = i + 1
            data_len = size if typ == b"reg" else 0   # other types carry no data in the tar
            extents.append(off)
            extents.append(size)
            if off < BLOCK or size < 0 or off + data_len > usize:
                raise FormatError(f"zTOC entry {i} (offset {off}, size {size}) lies outside the "
                                  f"{usize}-byte archive")
            if xattrs_anywhere:
                xvec = self._fields(i)[C.FM_XATTRS]
                if xvec:
                    self._check_xattrs(i, self._pax(xvec))
            if off < prev_end + BLOCK:
                ordered = False
            # the next header starts at this entry's data end rounded up to a block
            prev_end = off + -(-data_len // BLOCK) * BLOCK
        self._check_names(first, self._count, names)
        if not ordered:   # entries out of stream order: sort, then check
            self._check_overlaps(r)

    def _check_names(self, first: int, end: int, names: list[bytes]) -> None:
        """Entries [first, end) have names the kernel could create (ztoc/limits.py); `names` are
        theirs. Short names without NUL pass every check, so a batch is looked at one entry at a
        time only when one of them is not (two C-speed passes instead of a test per entry)."""
        if b"\0" in b"/".join(names) or max(map(len, names), default=0) > limits.MAX_COMPONENT_BYTES.value:
            for i in range(first, end):
                f = self._fields(i)
                limits.check_name(f[C.FM_NAME], f"zTOC entry {i} name")
                limits.check_name(f[C.FM_LINKNAME], f"zTOC entry {i} link target", link=True)
        names.clear()

    def _check_xattrs(self, i: int, pax: list[tuple[bytes, bytes]]) -> None:
        """xattrs the kernel could set: a larger one is not in a full unpack of the layer."""
        prefix = XATTR_PREFIX.encode()
        for key, value in pax:
            if key.startswith(prefix):
                limits.MAX_XATTR_NAME_BYTES.check(len(key) - len(prefix), f"zTOC entry {i} xattr name")
                limits.MAX_XATTR_VALUE_BYTES.check(len(value), f"zTOC entry {i} xattr {key[len(prefix):][:64]!r}")

    def _pax(self, vec: int) -> list[tuple[bytes, bytes]]:
        """Raw (key, value) of the PAX records in the vector at `vec`, every reference checked. Each
        record is a table of two strings; writers give them all one vtable (`_pax_plan`)."""
        buf, n, r = self._data, len(self._data), self._r
        xs, xn = r.vector(vec, 4)
        plans = self._pax_plans
        out = []
        for ep in range(xs, xs + 4 * xn, 4):
            t = ep + _U32(buf, ep)[0]
            if t > n - 4:
                raise r.bad(f"reference at {ep} points outside the buffer")
            vt = t - _I32(buf, t)[0]
            objlen, key_at, value_at = plans.get(vt) or self._pax_plan(vt)
            if t + objlen > n:
                raise r.bad(f"PAX record table at {t} runs past the end of the buffer")
            out.append((self._checked_string(t, key_at), self._checked_string(t, value_at)))
        return out

    def _pax_plan(self, vt: int) -> tuple[int, int, int]:
        """(table length, key field offset, value field offset; 0: absent) of the PAX record tables
        that use the vtable at `vt`: checked once, cached."""
        objlen, (key_at, value_at) = self._vtable(vt, 2)
        if objlen < 4:
            raise self._r.bad(f"malformed vtable at {vt}")
        for slot, off in enumerate((key_at, value_at)):
            if off and off + 4 > objlen:
                raise self._r.bad(f"field {slot} of the table with vtable {vt} lies outside it")
        plan = self._pax_plans[vt] = (objlen, key_at, value_at)
        return plan

    def _vtable(self, vt: int, fields: int) -> tuple[int, list[int]]:
        """The table length and the offsets of the first `fields` fields (0: absent) that the
        vtable at `vt` gives, its own bounds checked."""
        buf, n = self._data, len(self._data)
        if not 0 <= vt <= n - 4:
            raise self._r.bad(f"vtable offset {vt} outside the buffer")
        vtlen, objlen = _U16(buf, vt)[0], _U16(buf, vt + 2)[0]
        if vtlen < 4 or vtlen & 1 or vt + vtlen > n:
            raise self._r.bad(f"malformed vtable at {vt}")
        return objlen, [_U16(buf, vt + 4 + 2 * k)[0] if 4 + 2 * k < vtlen else 0 for k in range(fields)]

    def _checked_string(self, t: int, at: int) -> bytes:
        """The string field at offset `at` of the table at `t` (b"" when absent), bounds-checked."""
        if not at:
            return b""
        buf, n = self._data, len(self._data)
        p = t + at
        s = p + _U32(buf, p)[0]
        if s > n - 4:
            raise self._r.bad(f"reference at {p} points outside the buffer")
        end = s + 4 + _U32(buf, s)[0]
        if end > n:
            raise self._r.bad(f"vector at {s} runs past the end")
        return buf[s + 4:end]

    def _check_overlaps(self, r: C.FlatReader) -> None:
        spans = []
        for i in range(self._count):
            e = self.entry(i)
            data_len = e.size if e.type == "reg" else 0
            spans.append((e.offset, e.offset + -(-data_len // BLOCK) * BLOCK, i))
        spans.sort()
        prev_end, prev_i = 0, -1
        for off, end, i in spans:
            if off < prev_end + BLOCK:
                raise FormatError(f"zTOC entries {prev_i} and {i} overlap (entry {i} at offset {off} "
                                  f"leaves no room for its header after offset {prev_end})")
            prev_end, prev_i = end, i

    # -- the contract (fs/layer_index.py) -------------------------------------------------

    @property
    def digest(self) -> str:
        """The digest of the zTOC's bytes (the index's identity: a view is keyed by it)."""
        if self._digest is None:
            self._digest = "sha256:" + hashlib.sha256(self._data).hexdigest()
        return self._digest

    def __len__(self) -> int:
        return self._count

    @property
    def may_have_xattrs(self) -> bool:
        """False only if no entry has an xattr: no PAX record of one appears anywhere in the zTOC."""
        return self._xattrs_anywhere

    def entry_name(self, i: int) -> bytes:
        """Entry i's name as stored, without decoding the rest of the entry (for lookups):
        `parse` noted where it starts, having checked its bounds."""
        if not 0 <= i < self._count:
            raise IndexError(f"zTOC entry {i} out of range (0..{self._count - 1})")
        p = self._names[i]
        if not p:
            return b""
        return self._data[p + 4:p + 4 + _U32(self._data, p)[0]]

    def tree_entries(self) -> Iterator[tuple[bytes, str, bytes]]:
        """(name, type, link target) of every entry in order, the target only for hardlinks:
        what building a directory tree needs, ~10x faster than decoding whole entries."""
        buf, plans, types, type_order = self._data, self._plans, self._types, _TYPE_ORDER
        hardlink = _TYPE_CODES[b"hardlink"]
        for i, p in enumerate(self._names):
            code = types[i]
            link = b""
            if code == hardlink:
                ep = self._entries_start + 4 * i
                t = ep + _U32(buf, ep)[0]
                link = _string(buf, t, plans[t - _I32(buf, t)[0]].link_at)
            yield buf[p + 4:p + 4 + _U32(buf, p)[0]] if p else b"", type_order[code], link

    def entry_extent(self, i: int) -> tuple[int, int]:
        """Entry i's data offset and size, as `entry(i)` has them, without decoding the entry."""
        if not 0 <= i < self._count:
            raise IndexError(f"zTOC entry {i} out of range (0..{self._count - 1})")
        return self._extents[2 * i], self._extents[2 * i + 1]

    def entry(self, i: int) -> TocEntry:
        if not 0 <= i < self._count:
            raise IndexError(f"zTOC entry {i} out of range (0..{self._count - 1})")
        (name, typ, off, size, linkname, mode, uid, gid, uname, gname, mod_time,
         devmajor, devminor, xvec) = self._fields(i)
        pax: dict[str, str] = {}
        xattrs: dict[str, bytes] = {}
        if xvec:
            for key, value in self._pax(xvec):
                k = _text(key)
                pax[k] = _text(value)
                if k.startswith(XATTR_PREFIX):
                    xattrs[k[len(XATTR_PREFIX):]] = value
        mod_time = _text(mod_time)
        mtime_ns = self._times.get(mod_time)
        if mtime_ns is None:
            mtime_ns = parse_rfc3339_nano(mod_time) if mod_time else 0
            if len(self._times) < 4096:   # bounded: a Ztoc must stay ~ the size of its bytes
                self._times[mod_time] = mtime_ns
        return TocEntry(_text(name), typ.decode(), off, size, _text(linkname), mode, uid, gid, _text(uname),
                        _text(gname), mod_time, mtime_ns, devmajor, devminor, pax, xattrs)

    def span_digest(self, i: int) -> str:
        self._check_span(i)
        return self._digest_bytes(i).decode()

    def verify_span(self, i: int, compressed: bytes) -> None:
        """IntegrityError unless `compressed` is exactly span i's bytes (by its digest)."""
        _spans.verify_span(self, i, compressed)

    def decompress_span(self, i: int, compressed: bytes) -> bytes:
        """Span i's uncompressed bytes from its verified compressed bytes."""
        return _spans.decompress_span(self, i, compressed)

    def span_receiver(self, i: int) -> SpanReceiver:
        """Takes span i's compressed bytes as they arrive; its finish() is verify_span then
        decompress_span."""
        return _spans.SpanReceiver(self, i)

    def span_compressed_range(self, i: int) -> tuple[int, int]:
        self._check_span(i)
        if self._points is None:
            return self._fixed_range(i)
        p = self._points
        start = p.ins[i] - (1 if p.bits[i] else 0)
        end = p.ins[i + 1] if i + 1 < self.num_spans else self.compressed_size
        return start, end

    def span_uncompressed_range(self, i: int) -> tuple[int, int]:
        self._check_span(i)
        if self._points is None:     # the archive may end before the file does (zero padding)
            start, end = self._fixed_range(i)
            return min(start, self.uncompressed_size), min(end, self.uncompressed_size)
        outs, usize = self._points.outs, self.uncompressed_size
        end = outs[i + 1] if i + 1 < self.num_spans else usize
        return min(outs[i], usize), min(end, usize)

    def spans_for(self, start: int, end: int) -> range:
        """The spans holding uncompressed bytes [start, end)."""
        start, end = max(start, 0), min(end, self.uncompressed_size)
        if end <= start:
            return range(0)
        if self._points is None:
            return range(start // self.span_size, (end - 1) // self.span_size + 1)
        outs = self._points.outs
        first = max(bisect_right(outs, start) - 1, 0)
        last = max(bisect_left(outs, end) - 1, first)
        return range(first, last + 1)

    def _fixed_range(self, i: int) -> tuple[int, int]:
        return i * self.span_size, min((i + 1) * self.span_size, self.compressed_size)

    def _check_span(self, i: int) -> None:
        if not 0 <= i < self.num_spans:
            raise FormatError(f"span id {i} out of range: the zTOC has {self.num_spans} spans")

    @property
    def checkpoints(self) -> GzipCheckpoints | None:
        """The gzip checkpoints (None for an uncompressed layer)."""
        return self._points

    def __repr__(self) -> str:
        return (f"<Ztoc {self.compression} {len(self)} entries, {self.num_spans} spans of "
                f"{self.span_size}, {self.compressed_size}->{self.uncompressed_size} bytes>")
