"""Check zTOC entries against their own tar headers before the lazy filesystem serves them.

Span digests prove the bytes of a layer, not its table of contents: a zTOC could
give a file another file's data offset, a setuid mode, another type or owner.
But every entry's tar header lies just before its data, inside spans the fetcher
verifies anyway (docs/SOCI-FORMAT-NOTES.md, "The zTOC"). Sorted by data offset,
entry k's header region is [data end of entry k-1 rounded up to 512, data offset
of entry k), and it must hold exactly entry k's header records (PAX `x`/`g`, GNU
`L`/`K`, then the main header, which ends at the data offset). The region is read through the span
fetcher (verified bytes only), parsed by the tar reader the unpacker uses too, and
compared with what the lazy filesystem serves: name as the unpacker normalises
it, type, size, permission bits, uid, gid, link target, device numbers, mtime
and the SCHILY.xattr.* records. An entry that differs is never served; the first
failure of an entry is logged with the layer, the entry and the field.

An entry omitted from the zTOC leaves its header and data inside the region of
the next entry, which then fails. What follows the last entry is checked by the
whole-layer check, once every span is cached: the complete tar, header by
header, must be exactly the zTOC's entries in offset order, then the
end-of-archive. A layer that fails it is broken: every request fails from then on.

Limits. Fail closed: a header region over MAX_HEADER_REGION bytes is not
parsed, and attributes that come from a global PAX header (`g`) in an earlier
region do not match the entry's own region, so such entries are refused.
An entry's region starts where its predecessor's data ends as the
predecessor's own tar header says: its header is read first for its type and
size. Else a zTOC could stretch the predecessor over the entry's PAX or GNU
records and leave the entry's main header alone in its region, with the
fields those records override (a uid, a long name). Not closed until the
whole-layer check: the predecessor's own region starts where the zTOC says
the entry before it ends, unconfirmed (confirming it would need every header
before it, i.e. most of the layer). So a zTOC that hides a file whose content
is itself a tar archive, and lists entries inside that content, gets those
entries past the per-entry check (the first of them fails, the ones after it
pass); their bytes are real bytes of the layer, in the wrong place. The
whole-layer check finds it.

zstd:chunked layers are not checked here: their index (zstdchunked/toc.py) serves a stream
of file contents without tar headers, and their TOC's digest is in the image manifest's
annotations, so it is the image author's word, as the tar is (see that module).
"""

from __future__ import annotations

import logging
import threading
from array import array
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Iterator, NoReturn

from lazyoci.errors import FormatError, IntegrityError, LazyociError
from lazyoci.fs.layer_index import IndexEntry, LayerIndex
from lazyoci.fs.span_cache import EntryStates
from lazyoci.libc import name_this_thread
from lazyoci.oci.whiteout import normalise
from lazyoci.tar import TarHeader, first_entry, iter_headers

log = logging.getLogger(__name__)

BLOCK = 512
MAX_HEADER_REGION = 1 << 20      # PAX records and long names larger than this are not parsed
DECODED_ENTRIES = 1024           # entries kept decoded between a check and the attributes served
UNCHECKED, GOOD, BAD = 0, 1, 2
_TAR_TYPES = {"reg": ("reg", "contiguous"), "hardlink": ("hardlink",), "symlink": ("symlink",),
              "char": ("char",), "block": ("block",), "dir": ("dir",), "fifo": ("fifo",)}

_NOT_CACHED = "(not cached)"
ReadRange = Callable[[int, int], bytes]
ReadCached = Callable[[int, int], "bytes | None"]


def _data_end(entry: IndexEntry) -> int:
    """Where the next header may start: data end rounded up to a block (only `reg` carries data)."""
    size = entry.size if entry.type == "reg" else 0
    return entry.offset + -(-size // BLOCK) * BLOCK


def mismatch(entry: IndexEntry, m: TarHeader) -> str | None:
    """The first field in which a zTOC entry differs from its tar header, or None."""
    e = entry
    if e.name != m.path and normalise(e.name) != normalise(m.path):    # equal as stored, mostly
        return "name"
    if m.type not in _TAR_TYPES.get(e.type, ()):
        return "type"
    if e.size != m.size:
        return "size"
    if e.mode & 0o7777 != m.mode & 0o7777:
        return "mode"
    if e.uid != m.uid:
        return "uid"
    if e.gid != m.gid:
        return "gid"
    if e.linkname != m.link:
        return "link target"
    if e.type in ("char", "block") and (e.devmajor, e.devminor) != (m.devmajor, m.devminor):
        return "device numbers"
    if e.mtime_ns != m.mtime_ns:
        return "mtime"
    if m.xattrs() != e.xattrs:
        return "xattrs"
    return None


def one_header(region: bytes) -> TarHeader | str:
    """The entry of a header region that holds exactly one entry's headers, or why not."""
    try:
        member = first_entry(region)
    except FormatError as e:
        return f"tar header ({e})"
    if member is None or member.offset != len(region):
        return "tar header (not exactly one header before the data)"
    return member


def check_region(entry: IndexEntry, region: bytes) -> str | None:
    """Compare an entry with the header region in front of its data; the differing field or None."""
    member = one_header(region)
    return member if isinstance(member, str) else mismatch(entry, member)


class LayerVerifier:
    """Which entries of one layer were checked against their tar headers, and the checks themselves.

    `read` returns verified bytes of the layer's tar stream (fetching spans as needed);
    `read_cached` the same from the disk cache only, or None; `read_layer` (default `read`)
    serves the whole-layer check, which is no workload's read and is not counted as one.
    Thread-safe: a race checks an entry twice, never serves it unchecked.

    `state`: where to keep each entry's state (one byte per entry; a fresh array if None), e.g.
    the span cache's (LayerCache.entry_states), in which the results of earlier processes stay:
    a check's result depends on nothing but the layer's bytes and the zTOC. Entries found bad
    there are checked again, so that their failure is logged by this process too.
    """

    def __init__(self, ztoc: LayerIndex, read: ReadRange, read_cached: ReadCached, layer: str,
                 read_layer: ReadRange | None = None, state: bytearray | None = None) -> None:
        self.ztoc = ztoc
        self.read = read
        self.read_layer = read_layer or read
        self.read_cached = read_cached
        self.layer = layer
        if state is None:
            state = bytearray(len(ztoc))
        elif len(state) != len(ztoc):
            raise ValueError(f"{len(state)} entry states for {len(ztoc)} zTOC entries")
        elif BAD in state:
            state[:] = bytes(state).replace(bytes([BAD]), bytes([UNCHECKED]))
        self.state = state
        # a check of many entries writes their results to the span cache's file once (EntryStates)
        self._hold: Callable[[], AbstractContextManager[None]] = \
            state.held if isinstance(state, EntryStates) else nullcontext
        self.broken: str | None = None        # why the whole-layer check failed
        self.layer_ok = False                 # the whole-layer check passed (now or in an earlier run)
        self._layer_check_started = False
        self.on_layer_ok: Callable[[], None] | None = None    # runs when the whole-layer check passes
        self.on_broken: Callable[[], None] | None = None      # runs once when the layer is found broken
        self._end_ok = bytearray(len(ztoc))    # the entry's data end is confirmed (`_end_confirmed`)
        self._decoded: dict[int, IndexEntry] = {}     # entries decoded by checks (`entry`)
        self._preds: array | None = None
        self._lock = threading.Lock()

    def entry(self, i: int) -> IndexEntry:
        """Index entry i, decoded once for its check and for the attributes served after it (a
        directory's children are checked together, then answered one by one); bounded."""
        entry = self._decoded.get(i)
        if entry is None:
            if len(self._decoded) >= DECODED_ENTRIES:
                self._decoded.clear()
            entry = self._decoded[i] = self.ztoc.entry(i)
        return entry

    def _regions(self, i: int, entry: IndexEntry, guess: bool = False) -> Iterator[tuple[int, int]]:
        """Where entry i's header region may start, with the entry whose data ends there (-1: the
        stream's start): after entry i-1 if the zTOC lists entries in stream order (as writers
        do), then after its predecessor in offset order (`_preds`, built once on the first miss).
        Were another entry between, its header would sit in the region and the check fail.
        `guess`: entry i-1's end from its extent, not decoded (types but reg carry no data and
        say size 0): for a region whose start is not confirmed anyway (`_end_confirmed`)."""
        preds = self._preds
        if preds is not None:
            pred = preds[i]
            yield pred, self._end(pred)
            return
        quick = i - 1
        offset, size = self.ztoc.entry_extent(quick) if quick >= 0 else (0, 0)
        if quick < 0 or offset < entry.offset:
            guessed = offset + -(-size // BLOCK) * BLOCK if guess and quick >= 0 else None
            if guessed is not None:
                yield quick, guessed
            if guessed is None or self._end(quick) != guessed:     # a header-only type with a size
                yield quick, self._end(quick)
        pred = self._preds_by_offset()[i]
        if pred != quick:
            yield pred, self._end(pred)

    def _end(self, i: int) -> int:
        """Where entry i's data ends, as its zTOC entry says (-1: the stream's start, 0)."""
        return 0 if i < 0 else _data_end(self.entry(i))

    def _preds_by_offset(self) -> array:
        """The entry before each entry in the tar stream by data offset (-1 for the first), for
        zTOCs not in stream order (built once)."""
        preds = self._preds
        if preds is None:
            with self._lock:
                preds = self._preds
                if preds is None:
                    ztoc = self.ztoc
                    order = sorted(range(len(ztoc)), key=lambda i: ztoc.entry_extent(i)[0])
                    preds = array("i", [0]) * len(ztoc)
                    prev = -1
                    for i in order:
                        preds[i] = prev
                        prev = i
                    self._preds = preds
        return preds

    def unchecked(self, entries: list[int]) -> list[int]:
        """The entries not yet known good; IntegrityError if one is known bad or the layer is broken."""
        if self.broken is not None:
            raise IntegrityError(f"layer {self.layer} is broken: {self.broken}")
        state = self.state
        todo = []
        for i in entries:
            s = state[i]
            if s == BAD:
                raise IntegrityError(f"layer {self.layer}: zTOC entry {i} does not match its tar header")
            if s != GOOD:
                todo.append(i)
        return todo

    def header_spans(self, entries: list[int]) -> list[int]:
        """The spans holding the header regions of those of `entries` not checked yet, and of the
        entries before them whose ends are not confirmed, sorted (what checking them would read;
        for fetching them ahead)."""
        spans: set[int] = set()
        for i in entries:
            if self.state[i] != UNCHECKED:
                continue
            pred = self._add_region(i, spans)
            if pred >= 0 and self.state[pred] != GOOD and not self._end_ok[pred]:
                self._add_region(pred, spans)
        return sorted(spans)

    def _add_region(self, i: int, spans: set[int]) -> int:
        """Add the spans of entry i's first candidate header region; the entry before it."""
        entry = self.entry(i)
        pred, start = next(self._regions(i, entry))
        if 0 <= entry.offset - start <= MAX_HEADER_REGION:
            spans.update(self.ztoc.spans_for(start, entry.offset))
        return pred

    def check_cached(self, entries: list[int]) -> bool:
        """Check entries whose header regions are in the disk cache; False if some need the network."""
        return self._check(entries, cached=True)

    def check(self, entries: list[int]) -> None:
        """Check entries, fetching their header regions if needed (call from a worker thread)."""
        self._check(entries, cached=False)

    def _check(self, entries: list[int], cached: bool) -> bool:
        with self._hold():
            return self._check_held(entries, cached)

    def _check_held(self, entries: list[int], cached: bool) -> bool:
        for i in self.unchecked(entries):
            entry = self.entry(i)
            field: str | None = "no header region"
            for pred, start in self._regions(i, entry):
                field = self._end_confirmed(pred, cached)
                if field is None:
                    field = self._compare(entry, start, cached)
                if field is _NOT_CACHED:
                    return False
                if field is None:
                    break
            if field is not None:
                self._bad(i, entry.name, field)
            self.state[i] = GOOD
        return True

    def _end_confirmed(self, i: int, cached: bool) -> str | None:
        """None once entry i's data end, where the next header region starts, is what i's own
        tar header says (its type and size); else why not, or _NOT_CACHED. Entry i's other fields
        are not checked here, and its own region starts where the entry before it claims to end:
        one level is what keeps a zTOC from stretching i over the next entry's PAX or GNU
        records, which would leave that entry's main header alone in its region."""
        if i < 0 or self.state[i] == GOOD or self._end_ok[i]:
            return None
        entry = self.entry(i)
        for _, start in self._regions(i, entry, guess=True):
            region = self._region(entry, start, cached)
            if region is _NOT_CACHED:
                return _NOT_CACHED
            member = region if isinstance(region, str) else one_header(region)
            if not isinstance(member, str) and member.data_length == _data_end(entry) - entry.offset:
                self._end_ok[i] = 1
                return None
        return f"the entry before it, {entry.name!r}, does not end where its tar header says"

    def _region(self, entry: IndexEntry, start: int, cached: bool) -> bytes | str:
        """The bytes [start, entry offset), why they are not read, or _NOT_CACHED if `cached`."""
        size = entry.offset - start
        if size > MAX_HEADER_REGION:
            return f"tar header region of {size} bytes is too large"
        if size < BLOCK:
            return "no room for a tar header before the data"
        region = self.read_cached(start, entry.offset) if cached else self.read(start, entry.offset)
        return _NOT_CACHED if region is None else region

    def _compare(self, entry: IndexEntry, start: int, cached: bool) -> str | None:
        """check_region over [start, entry offset); _NOT_CACHED if `cached` and it is not."""
        region = self._region(entry, start, cached)
        return region if isinstance(region, str) else check_region(entry, region)

    def _bad(self, i: int, name: str, field: str) -> None:
        first = self.state[i] != BAD
        self.state[i] = BAD
        msg = f"layer {self.layer}: zTOC entry {name!r} does not match its tar header: {field}"
        if first:
            log.error("%s; the entry is not served", msg)
        raise IntegrityError(msg)

    def check_layer_once(self, complete: bool, read: ReadRange | None = None) -> None:
        """Start the whole-layer check in a thread, once: when every span is cached (`complete`),
        or, with `read`, at once through that reader (one that waits for spans the background
        fetcher brings, so that the check is done about when the last span arrives)."""
        if not complete or self._layer_check_started:
            return
        with self._lock:
            if self._layer_check_started:
                return
            self._layer_check_started = True

        def run() -> None:
            name_this_thread()
            try:
                self.check_layer(read)
                log.info("layer %s: every tar header matches its zTOC", self.layer)
                if self.on_layer_ok is not None:
                    self.on_layer_ok()
            except IntegrityError:
                pass                       # logged by _broken
            except LazyociError as e:      # the reader gave up (the layer went): per-entry checks stay
                log.info("layer %s: the whole-layer check stopped: %s", self.layer, e)
            except Exception:              # a check that cannot run leaves per-entry checks in place
                log.exception("layer %s: the whole-layer check failed to run", self.layer)

        threading.Thread(target=run, name="layer-check", daemon=True).start()

    def passed_before(self) -> None:
        """The whole-layer check passed in an earlier run (recorded with the span cache): every
        entry is good, nothing is checked again."""
        self._layer_check_started = True
        self.state[:] = bytes([GOOD]) * len(self.state)
        self.layer_ok = True

    def check_layer(self, read: ReadRange | None = None) -> None:
        """The whole-layer check (every span cached, or `read` waits for them): the tar is exactly
        the zTOC's entries, in offset order, then the end-of-archive. A mismatch marks the layer
        broken (logged) and raises."""
        ztoc = self.ztoc
        read = read or self.read_layer
        try:
            with self._hold():
                # writers list entries in stream order: try that first, each entry decoded once; the
                # first entry not at the next header's offset sends the check to offset order
                if not self._check_tiling(range(len(ztoc)), read, in_order=True):
                    self._check_tiling(sorted(range(len(ztoc)), key=lambda i: ztoc.entry(i).offset), read,
                                       in_order=False)
        except FormatError as e:
            self._broken(f"the layer's tar cannot be read: {e}")
        self.layer_ok = True

    def _check_tiling(self, order: range | list[int], read: ReadRange, in_order: bool) -> bool:
        """Walk the tar's headers beside the entries in `order`; False if `in_order` and an entry is
        not where the next header is (the zTOC may list entries out of stream order)."""
        ztoc = self.ztoc
        members = iter_headers(_HeaderWindows(read, ztoc.uncompressed_size))
        for i in order:
            entry = ztoc.entry(i)
            m = next(members, None)
            if m is None or m.offset != entry.offset:
                if in_order:
                    return False
                self._broken(f"the tar has a header the zTOC lacks before entry {entry.name!r}"
                             if m is not None else f"the tar ends before entry {entry.name!r}")
            field = mismatch(entry, m)
            if field is not None:
                self._broken(f"zTOC entry {entry.name!r} does not match its tar header: {field}")
            self.state[i] = GOOD
        extra = next(members, None)
        if extra is not None:
            self._broken(f"the tar has an entry the zTOC lacks: {extra.path!r}")
        return True

    def _broken(self, why: str) -> NoReturn:
        if self.broken is None:
            self.broken = why
            log.error("layer %s is broken: %s; nothing of it is served", self.layer, why)
            if self.on_broken is not None:
                self.on_broken()
        raise IntegrityError(f"layer {self.layer} is broken: {why}")


class _HeaderWindows:
    """The layer's verified tar stream as the whole-layer check reads it: headers through windows of
    WINDOW bytes, file data skipped by arithmetic. The check needs no byte of file data (the span
    digests prove those), so it does not copy the whole layer through Python while a workload runs."""

    WINDOW = 256 << 10

    def __init__(self, read: ReadRange, size: int) -> None:
        self._read = read
        self._size = size
        self._pos = 0
        self._base = 0
        self._buf = b""

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int) -> int:
        self._pos = min(max(offset, 0), self._size)
        return self._pos

    def read(self, size: int) -> bytes:
        end = min(self._pos + size, self._size)
        if end <= self._pos:
            return b""
        if not self._base <= self._pos or end > self._base + len(self._buf):
            self._base = self._pos
            self._buf = self._read(self._pos, max(end, min(self._pos + self.WINDOW, self._size)))
        out = self._buf[self._pos - self._base:end - self._base]
        self._pos = end
        return out
