"""libz through ctypes: the parts of inflate that Python's `zlib` module hides.

zTOC checkpoints need `Z_BLOCK` (stop at deflate block ends), the block-end and
last-block flags of `data_type`, `inflatePrime` (resume mid-byte) and
`inflateSetDictionary` on a raw stream. ctypes releases the GIL for the length
of each foreign call, so inflating overlaps with hashing in another thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from lazyoci.errors import FormatError

Z_OK = 0
Z_STREAM_END = 1
Z_NEED_DICT = 2
Z_BUF_ERROR = -5
Z_NO_FLUSH = 0
Z_BLOCK = 5

WINDOW_SIZE = 32768
GZIP_OR_ZLIB = 47   # 15 + 32: automatic gzip/zlib header detection
GZIP_ONLY = 31      # 15 + 16
RAW = -15           # raw deflate (span extraction starts mid-stream)


class ZStream(ctypes.Structure):
    """zlib's z_stream (LP64 layout; uInt is 32-bit, uLong 64-bit)."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


def _load() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libz.so.1")
    except OSError:  # non-Debian layouts
        name = ctypes.util.find_library("z")
        if not name:
            raise FormatError("libz (zlib1g) is not installed: cannot index gzip layers") from None
        lib = ctypes.CDLL(name)
    p = ctypes.POINTER(ZStream)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.inflate.argtypes = [p, ctypes.c_int]
    lib.inflateEnd.argtypes = [p]
    lib.inflateReset2.argtypes = [p, ctypes.c_int]
    lib.inflatePrime.argtypes = [p, ctypes.c_int, ctypes.c_int]
    lib.inflateSetDictionary.argtypes = [p, ctypes.c_void_p, ctypes.c_uint]
    for f in (lib.inflateInit2_, lib.inflate, lib.inflateEnd, lib.inflateReset2,
              lib.inflatePrime, lib.inflateSetDictionary):
        f.restype = ctypes.c_int
    return lib


_lib = _load()
_VERSION = _lib.zlibVersion()


class Inflater:
    """One z_stream. Callers set next_in/avail_in/next_out/avail_out on `.s` directly
    (attribute access on a ctypes Structure is cheap; no copies of the data)."""

    def __init__(self, window_bits: int) -> None:
        self.s = ZStream()
        self._ptr = ctypes.byref(self.s)
        rc = _lib.inflateInit2_(self._ptr, window_bits, _VERSION, ctypes.sizeof(ZStream))
        if rc != Z_OK:
            raise FormatError(f"zlib inflateInit2 failed ({rc})")
        self._open = True

    def inflate(self, flush: int) -> int:
        """One inflate call; data errors become FormatError with zlib's message."""
        rc = _lib.inflate(self._ptr, flush)
        if rc < 0 and rc != Z_BUF_ERROR or rc == Z_NEED_DICT:
            msg = self.s.msg.decode(errors="replace") if self.s.msg else f"error {rc}"
            raise FormatError(f"corrupt deflate data: {msg}")
        return rc

    def reset(self, window_bits: int) -> None:
        if _lib.inflateReset2(self._ptr, window_bits) != Z_OK:
            raise FormatError("zlib inflateReset2 failed")

    def prime(self, bits: int, value: int) -> None:
        if _lib.inflatePrime(self._ptr, bits, value) != Z_OK:
            raise FormatError("zlib inflatePrime failed")

    def set_dictionary(self, window: bytes) -> None:
        if _lib.inflateSetDictionary(self._ptr, window, len(window)) != Z_OK:
            raise FormatError("zlib inflateSetDictionary failed")

    def close(self) -> None:
        if self._open:
            _lib.inflateEnd(self._ptr)
            self._open = False

    def __del__(self) -> None:
        self.close()


def address(buf: ctypes.Array) -> int:
    """The address of a ctypes buffer (to point next_in/next_out into it)."""
    return ctypes.addressof(buf)
