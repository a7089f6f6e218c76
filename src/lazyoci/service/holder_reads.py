"""READs the FUSE session holder answers itself, from the span cache, without the service.

A `run` from a lazy layer is mostly READs of files whose spans are in the disk cache already,
and each one went kernel → holder → service → holder → kernel, its data copied four times. The
service hands every layer it mounts to the holder (service/holder_offers.py): the span cache's
data file, the cache's map of span states and the layer's read map (both shared memory). The
holder answers a READ with one `pread` and one write to `/dev/fuse` when nothing is left for the
service to do for it:

- the file passed its tar header check in the service (its LOOKUP did that), and the service
  has written where the file's bytes lie (the read map);
- every span the READ covers is in the cache and a READ of it reached the service already, with
  no read-ahead planned from it still to start (span state READ): the service's bookkeeping (the
  read-ahead window, the read order `soci optimize` records) sees every span's first read;
- if the file goes on past those spans, the next span is cached (the service would fetch it now).

Once a layer is complete in the span cache and every tar header matched its index, the service
writes every file's place and marks the map COMPLETE: the holder then answers every READ of it.
A layer found broken is marked STOPPED: the holder answers none of it from then on.

What keeps it exact: the service takes a layer back (`withdraw`) before it changes a byte of its
data file (eviction punches holes, a purge deletes it) or stops serving the view, and it waits for
the holder's answer; the holder drops every layer when the service that handed it over detaches,
and the next service hands over what it mounts. A span state is set only after the span's bytes
were verified and written, and the service writes a file's place before its size.

It also answers LOOKUPs in a directory once the service has listed that directory's names in the
read map (at the directory's first LOOKUP it answered): a name the directory does not have gets an
entry with no node, which the kernel remembers for as long as the service's own answer would say;
a name it has gets the entry the service wrote for that node once it passed its header check
(every node it checks: the service checks a directory's children whose headers are cached when
the first name is looked up in it). Python's imports look up many names of one directory, and
overlayfs looks a name up in every layer above the one that has it. Then GETXATTR of overlayfs'
opaque marker, which overlayfs asks of every directory it looks up: answered for every node whose
entry is written (the service writes whether it is opaque with it). And the READDIR that follows
a listed directory's last entry (the kernel asks until it gets none; a listing is cached by the
kernel, so a start lists each directory once and half its READDIRs were these): no entries.

The read map, 64-bit integers: FLAGS, NODES (n), SPANS (s), the seconds a name's absence may be
remembered, two words of the key of the name hash; then s+1 span bounds (the uncompressed offset
of each span's start, and the layer's size); then two per node of the layer's tree: the tar offset
of the file's data and its size plus one (0: not answered here; -1 in the second: a directory
whose names are listed, and then the first is how many it has); then ENTRY_WORDS per node: the
node's struct fuse_entry_out as the service answers its LOOKUP (node ID 0: not written yet) and
its marks (OPAQUE); then a hash set of the listed names (open addressing, `_name_slots(n)` slots,
0 empty) and beside it the node each slot's name is (plus one; 0: two listed names share the
hash, the service answers). The hash is keyed with a random key each map gets, so no image can
choose names that share one. Node n of the layer in slot S is the kernel's node ID
(S << 32) | (n + 1) (fs/layer_fs.py). This module imports only the standard library: the holder
is kept small.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import struct
import threading
from bisect import bisect_right
from collections.abc import Iterable
from typing import Any

__all__ = ["COMPLETE", "NO_XATTRS", "OPAQUE", "PLAIN_ROOT", "ReadMap", "STOPPED", "ServedReads", "SLOT_SHIFT",
           "SPAN_CACHED", "SPAN_READ", "entry_out"]

_IN_HEADER_SIZE = 40                   # struct fuse_in_header
_GETXATTR_IN = struct.Struct("<I4x")   # struct fuse_getxattr_in: size, padding; the name follows
_GETXATTR_OUT = struct.Struct("<I4x")  # struct fuse_getxattr_out: size, padding
_OPAQUE_NAME = b"trusted.overlay.opaque"
_READ_IN = struct.Struct("<QQI")       # struct fuse_read_in: fh, offset, size, ...
_OUT_HEADER = struct.Struct("<IiQ")    # struct fuse_out_header: len, error, unique
# Node IDs of the lazy mount: (slot << SLOT_SHIFT) | (node + 1). fs/layer_fs.py makes them from this
# constant, so the holder can never read one layout while the service answers another.
SLOT_SHIFT = 32
_NODE_MASK = (1 << SLOT_SHIFT) - 1
# The root of the plain mount (service/session_holder.py) as the service sees it: the holder gives
# the service this node ID for that mount's root (1, as every FUSE mount's), which no layer's node
# has (slots start at 1), so the service tells the two roots apart.
PLAIN_ROOT = 2

# Span states in the span cache's shared map (fs/span_cache.py): 0 not cached.
SPAN_CACHED = 1                        # verified and in the data file
SPAN_READ = 2                          # ... and the service has seen its first read

_FLAGS, _NODES, _SPANS, _ABSENT_SECONDS, _KEY, _HEADER_WORDS = 0, 1, 2, 3, 4, 6
_KEY_BYTES = 16
# FLAGS: answer every file; answer nothing; the layer has no xattrs (its index says so: the service
# looks none up)
COMPLETE, STOPPED, NO_XATTRS = 1, 2, 4
_LISTED = -1                           # a directory's second word: its names are in the hash set
# The service's READDIR offsets (fs/layer_fs.py): 1 after ".", 2 after "..", 3 + i after child i;
# so a READDIR from offset children + _AFTER_DOTS on has nothing left to give.
_AFTER_DOTS = 2
# struct fuse_entry_out: nodeid, generation, entry_valid, attr_valid, their nsec; then struct
# fuse_attr: ino, size, blocks, atime, mtime, ctime, their nsec, mode, nlink, uid, gid, rdev, blksize,
# flags (128 bytes, 16 words). With no node: the attributes zeroed.
_ENTRY_OUT = struct.Struct("<QQQQII")
_ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
_ABSENT_ENTRY = struct.Struct("<QQQQII88x")
_ENTRY_OUT_WORDS = 16
ENTRY_WORDS = _ENTRY_OUT_WORDS + 1     # and the node's marks
OPAQUE = 1                             # a mark: the node has overlayfs' opaque marker
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1


def _name_slots(nodes: int) -> int:
    """Slots of the name hash set: a power of two, at most half of them full (a name per node)."""
    return 1 << max(4, (2 * nodes).bit_length())


def _name_hash(key: bytes, directory: int, name: bytes) -> int:
    """Never 0 (an empty slot)."""
    h = hashlib.blake2b(directory.to_bytes(4, "little") + name, digest_size=8, key=key).digest()
    return int.from_bytes(h, "little", signed=True) | 1


_TIMEOUTS: dict[float, tuple[int, int]] = {}    # a service answers with a handful of timeouts


def _timeout(seconds: float) -> tuple[int, int]:
    """A timeout as the kernel takes it, whole seconds and nanoseconds (as libfuse converts it)."""
    out = _TIMEOUTS.get(seconds)
    if out is None:
        whole = min(max(int(seconds), 0), _U64)
        out = (whole, min(max(int((seconds - whole) * 1e9), 0), 999_999_999))
        if len(_TIMEOUTS) < 64:
            _TIMEOUTS[seconds] = out
    return out


def entry_out(a: Any) -> bytes | None:
    """struct fuse_entry_out of attributes named as pyfuse3's EntryAttributes names them, field for
    field what libfuse makes of them for a LOOKUP reply (integers cut to the field's width); None
    for a time before 1970, which the service alone answers (C divides such times otherwise).
    Written for every child a directory's sweep checks, so the common case (one time for all
    three) divides once."""
    atime, mtime, ctime = a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns
    if atime < 0 or mtime < 0 or ctime < 0:
        return None
    entry_valid, entry_nsec = _timeout(a.entry_timeout)
    attr_valid, attr_nsec = _timeout(a.attr_timeout)
    a_s, a_ns = divmod(atime, 1_000_000_000)
    m_s, m_ns = (a_s, a_ns) if mtime == atime else divmod(mtime, 1_000_000_000)
    c_s, c_ns = (a_s, a_ns) if ctime == atime else divmod(ctime, 1_000_000_000)
    ino = a.st_ino & _U64
    return _ENTRY_OUT.pack(ino, a.generation & _U64, entry_valid, attr_valid, entry_nsec, attr_nsec) + \
        _ATTR.pack(ino, a.st_size & _U64, a.st_blocks & _U64, a_s, m_s, c_s,
                   a_ns, m_ns, c_ns, a.st_mode & _U32, a.st_nlink & _U32, a.st_uid & _U32,
                   a.st_gid & _U32, a.st_rdev & _U32, a.st_blksize & _U32, 0)


class ReadMap:
    """One layer's read map in shared memory: written by the service, read by the holder."""

    def __init__(self, fd: int, writable: bool) -> None:
        """Map the read map in `fd` (the caller keeps the descriptor)."""
        self.fd = -1                   # the map's own descriptor, in the service (`create`)
        size = os.fstat(fd).st_size
        self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED,
                               mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        self.words = memoryview(self._mmap).cast("q")
        self.nodes, self.spans = self.words[_NODES], self.words[_SPANS]
        if min(self.nodes, self.spans) < 0 or len(self.words) < _map_words(self.nodes, self.spans + 1):
            self.close()
            raise OSError(f"a read map of {size} bytes for {self.nodes} nodes and {self.spans} spans")
        files = _HEADER_WORDS + self.spans + 1
        entries = files + 2 * self.nodes
        names = entries + ENTRY_WORDS * self.nodes
        slots = _name_slots(self.nodes)
        self.key = bytes(self.words[_KEY:_KEY + 2])
        self.bounds = self.words[_HEADER_WORDS:files]
        self.files = self.words[files:entries]
        self.entries = self.words[entries:names]
        self.names = self.words[names:names + slots]
        self.name_nodes = self.words[names + slots:names + 2 * slots]
        self._mask = slots - 1
        self._listing = threading.Lock()
        self._named = 0                        # names listed so far (service side)

    @classmethod
    def create(cls, nodes: int, bounds: list[int], absent_seconds: int, flags: int = 0) -> "ReadMap":
        """A new read map in a memfd of its own (`fd`), nothing answered yet, for `nodes` nodes
        and spans starting at `bounds` (the last one: the layer's size); the kernel may remember
        that a name is absent for `absent_seconds`; `flags` to start with (NO_XATTRS)."""
        fd = os.memfd_create("lazyoci-read-map", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 8 * _map_words(nodes, len(bounds)))
            os.pwrite(fd, struct.pack("<4q", flags, nodes, len(bounds) - 1, absent_seconds) +
                      os.urandom(_KEY_BYTES) + struct.pack(f"<{len(bounds)}q", *bounds), 0)
            read_map = cls(fd, writable=True)
        except BaseException:
            os.close(fd)
            raise
        read_map.fd = fd
        return read_map

    @property
    def flags(self) -> int:
        return self.words[_FLAGS]

    def publish(self, node: int, offset: int, size: int) -> None:
        """The holder may answer READs of `node`, a file whose data lies at `offset` in the tar."""
        self.files[2 * node] = offset
        self.files[2 * node + 1] = size + 1      # last: the holder reads the place only after it

    def published(self, node: int) -> bool:
        return self.files[2 * node + 1] != 0

    def publish_entry(self, node: int, entry: bytes | None, marks: int) -> None:
        """The holder may answer a LOOKUP of `node`'s name with `entry` (its struct fuse_entry_out,
        written once: a node's attributes never change) and GETXATTRs of it from `marks`."""
        e = ENTRY_WORDS * node
        if entry is None or self.entries[e] != 0 or len(entry) != 8 * _ENTRY_OUT_WORDS:
            return
        self.entries[e + _ENTRY_OUT_WORDS] = marks
        self.entries[e + 1:e + _ENTRY_OUT_WORDS] = memoryview(entry[8:]).cast("q")
        self.entries[e] = int.from_bytes(entry[:8], "little", signed=True)   # last: the holder reads it first

    def entry_published(self, node: int) -> bool:
        return self.entries[ENTRY_WORDS * node] != 0

    def list_directory(self, node: int, children: Iterable[tuple[bytes, int]]) -> None:
        """The holder may answer LOOKUPs in directory `node` itself: `children` are all of its
        names, each with its node."""
        children = list(children)
        with self._listing:
            if self.files[2 * node + 1] == _LISTED or 2 * (self._named + len(children)) > len(self.names):
                return       # listed already, or more names than the layer has nodes: not answered here
            self._named += len(children)
            for name, child in children:
                h = _name_hash(self.key, node, name)
                i = h & self._mask
                while (slot := self.names[i]) != 0 and slot != h:
                    i = (i + 1) & self._mask
                if slot == h:
                    self.name_nodes[i] = 0           # two names, one hash: the service answers both
                else:
                    self.name_nodes[i] = child + 1
                    self.names[i] = h
            self.files[2 * node] = len(children)
            self.files[2 * node + 1] = _LISTED       # last: the holder probes only after it

    def listed(self, node: int) -> bool:
        return self.files[2 * node + 1] == _LISTED

    def find(self, node: int, name: bytes) -> int | None:
        """In listed directory `node`: None if it has no such name, else the name's node (-1 if
        the service must say: two names share its hash)."""
        h = _name_hash(self.key, node, name)
        i = h & self._mask
        while (slot := self.names[i]) != 0:
            if slot == h:
                return self.name_nodes[i] - 1
            i = (i + 1) & self._mask
        return None

    def set_flag(self, flag: int, on: bool = True) -> None:
        self.words[_FLAGS] = self.words[_FLAGS] | flag if on else self.words[_FLAGS] & ~flag

    def close_descriptor(self) -> None:
        """Close the map's own descriptor; the mapping stays for whoever still holds the map."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.close_descriptor()
        for view in ("bounds", "files", "entries", "names", "name_nodes", "words"):
            v = self.__dict__.pop(view, None)
            if v is not None:
                v.release()
        self._mmap.close()


def _map_words(nodes: int, bounds: int) -> int:
    return _HEADER_WORDS + bounds + (2 + ENTRY_WORDS) * nodes + 2 * _name_slots(nodes)


class _Layer:
    """What the holder keeps of one served layer."""

    __slots__ = ("data_fd", "map", "states", "_states_mmap")

    def __init__(self, data_fd: int, states_fd: int, map_fd: int) -> None:
        self.map = ReadMap(map_fd, writable=False)
        try:
            size = os.fstat(states_fd).st_size
            if size < self.map.spans:
                raise OSError(f"{size} span states for {self.map.spans} spans")
            self._states_mmap = mmap.mmap(states_fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            self.map.close()
            raise
        self.states = memoryview(self._states_mmap)
        self.data_fd = data_fd

    def close(self) -> None:
        os.close(self.data_fd)
        self.states.release()
        self._states_mmap.close()
        self.map.close()


class ServedReads:
    """The layers whose READs the holder may answer: slot -> data file, span states, read map."""

    def __init__(self) -> None:
        self._layers: dict[int, _Layer] = {}
        self.answered = 0                  # READs answered here
        self.bytes = 0                     # and the bytes they returned
        self.lookups = 0                   # LOOKUPs answered here
        self.xattrs = 0                    # and GETXATTRs

    def __len__(self) -> int:
        return len(self._layers)

    def serve(self, slot: int, data_fd: int, states_fd: int, map_fd: int) -> None:
        """Answer what READs of the layer in `slot` it can; takes the data descriptor (closed if
        the maps cannot be read: OSError) and maps the other two (the caller closes them)."""
        try:
            layer = _Layer(data_fd, states_fd, map_fd)
        except (OSError, ValueError) as e:
            os.close(data_fd)
            raise OSError(f"cannot map the layer's read map: {e}") from None
        self.withdraw(slot)
        self._layers[slot] = layer

    def withdraw(self, slot: int) -> bool:
        """Stop answering READs of the layer in `slot`; False if it was not served."""
        served = self._layers.pop(slot, None)
        if served is None:
            return False
        served.close()
        return True

    def clear(self) -> None:
        for slot in list(self._layers):
            self.withdraw(slot)

    def _node(self, nodeid: int) -> tuple[_Layer, int, int] | None:
        """The served layer of a node ID, the node's number in it and the map's flags; None if
        the holder answers nothing of it (not served, stopped, out of range)."""
        served = self._layers.get(nodeid >> SLOT_SHIFT)
        if served is None:
            return None
        n = (nodeid & _NODE_MASK) - 1
        flags = served.map.words[_FLAGS]
        if flags & STOPPED or not 0 <= n < served.map.nodes:
            return None
        return served, n, flags

    def _listed(self, nodeid: int) -> tuple[ReadMap, int] | None:
        """The read map and node of a directory whose names the service listed; None if the
        holder answers nothing in it."""
        found = self._node(nodeid)
        if found is None:
            return None
        served, d, _ = found
        return (served.map, d) if served.map.files[2 * d + 1] == _LISTED else None

    def answer_lookup(self, fuse_fd: int, message: bytearray, length: int, nodeid: int, unique: int) -> bool:
        """Answer a LOOKUP (`message[:length]`) in a listed directory: an entry with no node for a
        name it does not have, the service's entry for one whose node it wrote; False to leave it
        to the service."""
        listed = self._listed(nodeid)
        if listed is None:
            return False
        m, d = listed
        name = bytes(message[_IN_HEADER_SIZE:length]).split(b"\0", 1)[0]
        if name in (b".", b".."):
            return False
        child = m.find(d, name)
        if child is None:
            reply = _OUT_HEADER.pack(_OUT_HEADER.size + _ABSENT_ENTRY.size, 0, unique) + \
                _ABSENT_ENTRY.pack(0, 0, m.words[_ABSENT_SECONDS], 0, 0, 0)
        else:
            e = ENTRY_WORDS * child
            if not 0 <= child < m.nodes or m.entries[e] == 0:
                return False               # the service must say (shared hash), or check it first
            reply = _OUT_HEADER.pack(_OUT_HEADER.size + 8 * _ENTRY_OUT_WORDS, 0, unique) + \
                m.entries[e:e + _ENTRY_OUT_WORDS].tobytes()
        if not _write(fuse_fd, reply):
            return False
        self.lookups += 1
        return True

    def answer_readdir_end(self, fuse_fd: int, message: bytearray, nodeid: int, unique: int) -> bool:
        """Answer a READDIR or READDIRPLUS (`message`) of a listed directory from past its last
        entry: no entries, the end of the listing; False to leave it to the service."""
        listed = self._listed(nodeid)
        if listed is None:
            return False
        m, d = listed
        _, offset, _ = _READ_IN.unpack_from(message, _IN_HEADER_SIZE)
        if offset < m.files[2 * d] + _AFTER_DOTS:
            return False
        return _write(fuse_fd, _OUT_HEADER.pack(_OUT_HEADER.size, 0, unique))

    def answer_getxattr(self, fuse_fd: int, message: bytearray, length: int, nodeid: int, unique: int) -> bool:
        """Answer a GETXATTR (`message[:length]`) of overlayfs' opaque marker of a node whose entry
        the service wrote (or of any node of a layer without xattrs); False to leave it to the
        service."""
        found = self._node(nodeid)
        if found is None:
            return False
        served, n, flags = found
        m = served.map
        start = _IN_HEADER_SIZE + _GETXATTR_IN.size
        if bytes(message[start:length]).split(b"\0", 1)[0] != _OPAQUE_NAME:
            return False
        e = ENTRY_WORDS * n
        if flags & NO_XATTRS:
            value = None
        elif m.entries[e] == 0:
            return False                   # not checked yet: the service checks it first
        else:
            value = b"y" if m.entries[e + _ENTRY_OUT_WORDS] & OPAQUE else None
        (size,) = _GETXATTR_IN.unpack_from(message, _IN_HEADER_SIZE)
        if value is None:
            reply = _OUT_HEADER.pack(_OUT_HEADER.size, -errno.ENODATA, unique)
        elif size == 0:
            reply = _OUT_HEADER.pack(_OUT_HEADER.size + _GETXATTR_OUT.size, 0, unique) + _GETXATTR_OUT.pack(len(value))
        elif size < len(value):
            reply = _OUT_HEADER.pack(_OUT_HEADER.size, -errno.ERANGE, unique)
        else:
            reply = _OUT_HEADER.pack(_OUT_HEADER.size + len(value), 0, unique) + value
        if not _write(fuse_fd, reply):
            return False
        self.xattrs += 1
        return True

    def answer(self, fuse_fd: int, message: bytearray, nodeid: int, unique: int) -> bool:
        """Answer a READ (`message`, its header included) of a served node on `fuse_fd`; False to
        leave it to the service."""
        found = self._node(nodeid)
        if found is None:
            return False
        served, n, flags = found
        m = served.map
        size = m.files[2 * n + 1] - 1
        if size < 0:
            return False
        base = m.files[2 * n]
        _, offset, want = _READ_IN.unpack_from(message, _IN_HEADER_SIZE)
        count = max(0, min(want, size - offset))
        if count and not flags & COMPLETE and not _spans_ready(m.bounds, served.states, base + offset,
                                                               base + offset + count, base + size):
            return False
        try:
            data = os.pread(served.data_fd, count, base + offset) if count else b""
        except OSError:
            return False                   # the disk failed us: the service answers (and says why)
        if len(data) != count:
            return False                   # never short (the file is the layer's size); if so, the service answers
        header = _OUT_HEADER.pack(_OUT_HEADER.size + count, 0, unique)
        try:
            os.writev(fuse_fd, [header, data])
        except FileNotFoundError:
            pass                           # the kernel gave the request up (interrupted)
        except OSError:
            return False                   # nothing reached the kernel: the service answers instead
        self.answered += 1
        self.bytes += count
        return True


def _write(fuse_fd: int, reply: bytes) -> bool:
    """False if nothing reached the kernel (the service answers instead)."""
    try:
        os.write(fuse_fd, reply)
    except FileNotFoundError:
        pass                               # the kernel gave the request up (interrupted)
    except OSError:
        return False
    return True


def _spans_ready(bounds: memoryview, states: memoryview, start: int, end: int, file_end: int) -> bool:
    """Every span of [start, end) read before, and the next one cached if the file goes on."""
    spans = len(bounds) - 1
    first = bisect_right(bounds, start, 0, spans) - 1
    last = bisect_right(bounds, end - 1, first, spans) - 1
    if first < 0:
        return False
    for i in range(first, last + 1):
        if states[i] != SPAN_READ:
            return False
    return file_end <= bounds[last + 1] or (last + 1 < spans and states[last + 1] != 0)
