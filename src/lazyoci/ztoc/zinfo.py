"""Gzip checkpoints ("zinfo"): building them in one pass, reading v1/v2 blobs, inflating a span.

The algorithm is zlib's examples/zran.c as SOCI uses it: inflate with Z_BLOCK,
and at the first deflate block end more than `span_size` uncompressed bytes
after the previous checkpoint, save (compressed offset, uncompressed offset,
unused bits, the 32 KiB window). The blob layout (docs/SOCI-FORMAT-NOTES.md,
"Gzip checkpoints") is packed little-endian: int32 N, int64 span_size, then N
times int64 in, int64 out, uint8 bits, 32768 bytes window. v1 blobs lack
checkpoint 0.
"""

from __future__ import annotations

import ctypes
import hashlib
import queue
import struct
import threading
from array import array
from collections.abc import Callable

from lazyoci.errors import FormatError
from lazyoci.ztoc import libz
from lazyoci.ztoc.libz import WINDOW_SIZE

HEADER = struct.Struct("<iq")
POINT = struct.Struct("<qqB")
CHECKPOINT_SIZE = POINT.size + WINDOW_SIZE          # 32785
_ZERO_WINDOW = bytes(WINDOW_SIZE)
_OUT_CAP = 4 << 20     # inflate output per call: large, so ctypes overhead stays negligible
_IN_CAP = 16 << 20   # avail_in is 32-bit: feed big chunks in pieces
SKIP_UNNEEDED_BLOCK_ENDS = True   # tests turn it off to check it changes nothing


def encode_checkpoints(span_size: int, points: list[tuple[int, int, int, bytes]]) -> bytes:
    """The zinfo v2 blob of (in, out, bits, window) checkpoints."""
    parts = [HEADER.pack(len(points), span_size)]
    for cin, cout, bits, window in points:
        parts.append(POINT.pack(cin, cout, bits))
        parts.append(window)
    return b"".join(parts)


class GzipCheckpoints:
    """A validated view over a zinfo v1 or v2 blob (no copy of the windows)."""

    def __init__(self, blob: bytes | memoryview, compressed_size: int) -> None:
        blob = memoryview(blob)
        if len(blob) < HEADER.size:
            raise FormatError(f"zTOC checkpoint blob of {len(blob)} bytes is too short for a zinfo header")
        n, self.span_size = HEADER.unpack_from(blob, 0)
        v2_len = HEADER.size + n * CHECKPOINT_SIZE
        if n < 1 or len(blob) not in (v2_len, v2_len - CHECKPOINT_SIZE):
            raise FormatError(
                f"zTOC checkpoint blob of {len(blob)} bytes fits neither zinfo v2 "
                f"({v2_len} bytes) nor v1 ({v2_len - CHECKPOINT_SIZE} bytes) for {n} checkpoints")
        if self.span_size <= 0:
            raise FormatError(f"zTOC checkpoint blob has span size {self.span_size}")
        self.version = 2 if len(blob) == v2_len else 1
        self._blob = blob
        self.count = n
        self.ins, self.outs, self.bits = array("q"), array("q"), array("B")
        if self.version == 1:   # checkpoint 0 was not written: right after a 10-byte gzip header
            self.ins.append(10)
            self.outs.append(0)
            self.bits.append(0)
        for k in range(n - len(self.ins)):
            cin, cout, bits = POINT.unpack_from(blob, HEADER.size + k * CHECKPOINT_SIZE)
            self.ins.append(cin)
            self.outs.append(cout)
            self.bits.append(bits)
        for i in range(n):
            cin, cout, bits = self.ins[i], self.outs[i], self.bits[i]
            if bits > 7 or cin < (1 if bits else 0) or cin > compressed_size:
                raise FormatError(f"zTOC checkpoint {i} (in={cin}, bits={bits}) lies outside the "
                                  f"{compressed_size}-byte layer")
            if i == 0 and cout != 0 or i and (cout <= self.outs[i - 1] or cin < self.ins[i - 1]):
                raise FormatError(f"zTOC checkpoint {i} (in={cin}, out={cout}) is out of order")

    def window(self, i: int) -> bytes | memoryview:
        if self.version == 1:
            if i == 0:
                return _ZERO_WINDOW
            i -= 1
        start = HEADER.size + i * CHECKPOINT_SIZE + POINT.size
        return self._blob[start:start + WINDOW_SIZE]


class SpanHasher:
    """sha256 of consecutive spans, computed in a worker thread in submission order.

    hashlib releases the GIL on large buffers and ctypes releases it around
    inflate, so hashing the compressed bytes overlaps with inflating them.
    Submitted buffers must be immutable (slices of `bytes`)."""

    _STOP = object()

    def __init__(self) -> None:
        self.digests: list[str] = []
        # bounded, so a hasher that falls behind (a busy machine) holds back the reader
        # instead of letting read chunks pile up in memory
        self._q: queue.Queue = queue.Queue(maxsize=32)
        self._thread = threading.Thread(target=self._work, name="ztoc-span-hash", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        h = hashlib.sha256()
        while (item := self._q.get()) is not self._STOP:
            if item is None:
                self.digests.append("sha256:" + h.hexdigest())
                h = hashlib.sha256()
            else:
                h.update(item)

    def update(self, data: memoryview | bytes) -> None:
        if len(data):
            self._q.put(data)

    def cut(self) -> None:
        """Ends the current span (its digest is appended in order)."""
        self._q.put(None)

    def close(self) -> list[str]:
        if self._thread.is_alive():
            self._q.put(self._STOP)
            self._thread.join()
        return self.digests


class GzipIndexer:
    """Inflates a gzip blob fed in chunks, recording checkpoints and span digests.

    Uncompressed output goes to `on_output` (a memoryview valid only during the
    call). Span i's digest covers the compressed bytes [start_i, in_{i+1}),
    start_i = in_i - 1 when the span starts mid-byte (SOCI's convention).
    `span_end`, given where the current span starts (uncompressed), says past which
    uncompressed offset a block end closes it (without it: start + span_size); it is asked
    after `on_output` has seen the output so far, so it may follow the archive's layout.
    Call `close` (or `finish`) to stop the hashing thread.
    """

    def __init__(self, span_size: int, on_output: Callable[[memoryview], None],
                 span_end: Callable[[int], int] | None = None) -> None:
        self.span_size = span_size
        self.on_output = on_output
        self.span_end = span_end or (lambda start: start + span_size)
        self._inf = libz.Inflater(libz.GZIP_OR_ZLIB)
        self._out = (ctypes.c_ubyte * (WINDOW_SIZE + _OUT_CAP))()   # 32 KiB history, then output
        self._outaddr = ctypes.addressof(self._out)
        self._outmv = memoryview(self._out).cast("B")
        self._opos = WINDOW_SIZE
        self.totin = self.totout = 0
        self._last = 0
        self.points: list[tuple[int, int, int, bytes]] = []
        self.digests: list[str] = []
        self._hasher = SpanHasher()
        self._hashing = False     # true from checkpoint 0 on (the gzip header is in no span)
        self._hashed = 0          # compressed offset up to which the current span is submitted
        self._last_byte = b""     # the byte before the current input piece (mid-byte span starts)
        self._member_end = False
        self.members = 0

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)   # inflate and the hasher read it in place: it must not change
        view = memoryview(chunk)
        addr = _address(chunk)
        for k in range(0, len(chunk), _IN_CAP):
            self._run(view[k:k + _IN_CAP], addr + k)

    def _run(self, piece: memoryview, addr: int) -> None:
        s = self._inf.s
        base = self.totin
        n = len(piece)
        s.next_in = addr
        s.avail_in = n
        span_end = self.span_end
        cap = WINDOW_SIZE + _OUT_CAP
        while s.avail_in:
            if self._member_end:   # another gzip member follows (pigz, mgzip)
                self._inf.reset(libz.GZIP_OR_ZLIB)
                self._member_end = False
            if self._opos == cap:   # keep the last 32 KiB as the next checkpoint's window
                ctypes.memmove(self._outaddr, self._outaddr + cap - WINDOW_SIZE, WINDOW_SIZE)
                self._opos = WINDOW_SIZE
            s.next_out = self._outaddr + self._opos
            out_room = cap - self._opos
            flush = libz.Z_BLOCK
            # Until the output passes the span's end, no block end can take a checkpoint:
            # inflate straight through them (one call per buffer instead of one per block).
            # Stopping at exactly that end keeps the positions those of Z_BLOCK everywhere
            # (an end that follows the archive does not move while the output is before it).
            if SKIP_UNNEEDED_BLOCK_ENDS and self.points:
                before_limit = span_end(self._last) - self.totout
                if before_limit > 0:
                    out_room = min(out_room, before_limit)
                    flush = libz.Z_NO_FLUSH
            s.avail_out = out_room
            in_before = s.avail_in
            try:
                rc = self._inf.inflate(flush)
            except FormatError as exc:
                raise FormatError(f"gzip layer is corrupt near compressed offset {self.totin}: {exc}") from None
            used = in_before - s.avail_in
            made = out_room - s.avail_out
            self.totin += used
            if made:
                self.on_output(self._outmv[self._opos:self._opos + made])
                self._opos += made
                self.totout += made
            if rc == libz.Z_STREAM_END:
                self._member_end = True
                self.members += 1
                continue
            if not used and not made:
                raise FormatError(f"gzip stream stalled at compressed offset {self.totin}")
            dt = s.data_type
            if dt & 128 and not dt & 64 and (self.totout == 0 or self.totout > span_end(self._last)):
                self._checkpoint(piece, base, dt & 7)
        if self._hashing:
            self._hasher.update(piece[self._hashed - base:])
            self._hashed = base + n
        self._last_byte = bytes(piece[n - 1:])

    def _checkpoint(self, piece: memoryview, base: int, bits: int) -> None:
        cin = self.totin
        hasher = self._hasher
        if self._hashing:
            hasher.update(piece[self._hashed - base:cin - base])
            hasher.cut()
        self._hashing = True
        start = cin - 1 if bits else cin
        if start < base:   # the shared byte is the last of the previous piece
            hasher.update(self._last_byte)
            start = base
        self._hashed = start
        window = bytes(self._outmv[self._opos - WINDOW_SIZE:self._opos])
        self.points.append((cin, self.totout, bits, window))
        self._last = self.totout

    def close(self) -> None:
        """Stops the hashing thread and frees the inflater (safe to call twice)."""
        self._hasher.close()
        self._inf.close()

    def __del__(self) -> None:   # an abandoned indexer must not leave its thread waiting
        if hasattr(self, "_hasher"):
            self.close()

    def finish(self) -> None:
        """Checks the stream ended cleanly, closes the last span and fills `digests`."""
        try:
            if self.totin == 0:
                raise FormatError("layer blob is empty, not gzip")
            if not self._member_end:
                raise FormatError(f"gzip stream truncated: it ends inside a member after {self.totin} bytes")
            if not self._hashing:
                raise FormatError("gzip stream holds no deflate data")
            self._hasher.cut()
        finally:
            self.digests = self._hasher.close()
            self._inf.close()


def _address(data: bytes) -> int:
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def _unfilled_bytes(length: int) -> bytes:
    """A new bytes object of `length` (> 1) whose contents are not set yet, for inflate to write
    into before anyone else holds it. A zeroed ctypes buffer and its copy out as bytes took a
    fifth of a span's inflate time (bench/README.md); CPython's own zlib module fills its output
    the same way. Sizes 0 and 1 may be shared singletons, so they are refused."""
    if length < 2:
        raise ValueError("an unfilled bytes object needs a length of at least 2")
    return _new_bytes(None, length)


def inflate_span(points: GzipCheckpoints, i: int, compressed: bytes, length: int) -> bytes:
    """`length` uncompressed bytes from checkpoint i; `compressed` starts at its compressed start.

    Crosses gzip member ends (skipping the trailer, then parsing the next header)."""
    if length <= 0:
        return b""
    inf = SpanInflater(points, i, length)
    try:
        inf.feed(compressed)
        return inf.finish()
    finally:
        inf.close()


class SpanInflater:
    """Inflates span i from its compressed bytes in pieces, as they arrive from the registry.

    A span's bytes come in over tens of milliseconds; inflating each piece as it comes, instead
    of the whole span after its last byte, takes the inflate off the wait of the read that asked
    for it. Its bytes are not verified yet: the caller checks the span's digest before anything
    inflated is used (`ztoc/spans.py`'s `SpanReceiver`). Output stops at `length` bytes, so no
    input makes it write more; bytes past that are ignored, as `inflate_span` ignores them."""

    def __init__(self, points: GzipCheckpoints, i: int, length: int) -> None:
        if length <= 0:
            raise ValueError("a span inflater needs a length of at least 1")
        self._i = i
        self._length = length
        self._bits = points.bits[i]
        self._window = bytes(points.window(i))
        self._inf = libz.Inflater(libz.RAW)
        # a new bytes object no one else holds until finish() returns it, filled (a 1-byte span
        # is inflated into 2 bytes' room and cut)
        self._out = _unfilled_bytes(max(length, 2))
        s = self._inf.s
        s.next_out = _address(self._out)
        s.avail_out = length
        self._started = False
        self._raw = True          # the first member is raw deflate: its 8-byte trailer is skipped by hand
        self._skip = 0            # trailer bytes still to skip before the next member's header
        self._next_member = False  # a member ended with its input: the next piece starts the next one
        self._stuck = False       # inflate made no progress (the bytes end the stream early)

    def feed(self, piece: bytes) -> None:
        """Inflate the next compressed bytes; FormatError for bytes that are not deflate data."""
        s = self._inf.s
        if not s.avail_out or self._stuck or not piece:
            return
        data = piece if type(piece) is bytes else bytes(piece)
        pos = 0
        if not self._started:
            if self._bits:
                self._inf.prime(self._bits, data[0] >> (8 - self._bits))
                pos = 1
            self._inf.set_dictionary(self._window)
            self._started = True
        s.next_in = _address(data) + pos
        s.avail_in = len(data) - pos
        while s.avail_out and s.avail_in:
            if self._skip:
                n = min(self._skip, s.avail_in)
                s.next_in += n
                s.avail_in -= n
                self._skip -= n
                if self._skip or not s.avail_in:
                    self._next_member = not self._skip
                    break
                self._inf.reset(libz.GZIP_ONLY)
                continue
            if self._next_member:
                self._inf.reset(libz.GZIP_ONLY)
                self._next_member = False
            before_in, before_out = s.avail_in, s.avail_out
            rc = self._inf.inflate(libz.Z_NO_FLUSH)
            if rc == libz.Z_STREAM_END:
                if self._raw:   # a raw inflater leaves the 8-byte gzip trailer unread
                    self._raw = False
                    self._skip = 8
                elif not s.avail_in:
                    self._next_member = True
                else:
                    self._inf.reset(libz.GZIP_ONLY)
                continue
            if s.avail_in == before_in and s.avail_out == before_out:
                self._stuck = True
                break
        s.next_in = None
        s.avail_in = 0

    def finish(self) -> bytes:
        """The span's bytes; FormatError if the compressed bytes fed ended before it does."""
        avail = self._inf.s.avail_out
        self.close()
        if avail:
            raise FormatError(f"span {self._i}: compressed bytes end {avail} bytes before the span does")
        out = self._out
        return out if len(out) == self._length else out[:self._length]

    def close(self) -> None:
        self._inf.close()
