"""Inflate through ctypes: the parts Python's `zlib` module hides.

zTOC checkpoints need `Z_BLOCK` (stop at deflate block ends), the block-end and
last-block flags of `data_type`, `inflatePrime` (resume mid-byte) and
`inflateSetDictionary` on a raw stream. ctypes releases the GIL for the length
of each foreign call, so inflating overlaps with hashing in another thread.

Two backends with the same semantics (zlib-ng's inflate is derived from
zlib's and stops at the same block ends with the same flags):
- "zlib-ng": the native `zng_*` API exported by the `zlib-ng` wheel's
  extension module; measured 2x faster than Debian's zlib 1.2.13 here;
- "zlib": the system libz.so.1, the fallback.
LAZYOCI_INFLATE=zlib|zlib-ng forces one (benchmarks, tests).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from dataclasses import dataclass

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
    """zlib's z_stream (LP64: uInt 32-bit, uLong 64-bit)."""

    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p), ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p), ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong),
    ]


class ZngStream(ctypes.Structure):
    """zlib-ng's native zng_stream (adler is uint32_t there)."""

    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint32), ("total_in", ctypes.c_size_t),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint32), ("total_out", ctypes.c_size_t),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p), ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p), ("data_type", ctypes.c_int),
        ("adler", ctypes.c_uint32), ("reserved", ctypes.c_ulong),
    ]


@dataclass(frozen=True)
class Backend:
    name: str
    version: str
    stream: type[ctypes.Structure]
    init: Callable[..., int]           # (stream*, window_bits) -> int
    inflate: Callable[..., int]
    end: Callable[..., int]
    reset2: Callable[..., int]
    prime: Callable[..., int]
    set_dictionary: Callable[..., int]


def _bind(lib: ctypes.CDLL, prefix: str, stream: type[ctypes.Structure]) -> dict[str, Callable[..., int]]:
    p = ctypes.POINTER(stream)
    sig = {"inflate": [p, ctypes.c_int], "inflateEnd": [p], "inflateReset2": [p, ctypes.c_int],
           "inflatePrime": [p, ctypes.c_int, ctypes.c_int],
           "inflateSetDictionary": [p, ctypes.c_void_p, ctypes.c_uint]}
    funcs = {}
    for name, args in sig.items():
        f = getattr(lib, prefix + name)
        f.argtypes, f.restype = args, ctypes.c_int
        funcs[name] = f
    return funcs


def _zlib_ng() -> Backend | None:
    try:
        from zlib_ng import zlib_ng as ext
        lib = ctypes.CDLL(ext.__file__)
        lib.zlibng_version.restype = ctypes.c_char_p
        f = _bind(lib, "zng_", ZngStream)
        init = lib.zng_inflateInit2
        init.argtypes, init.restype = [ctypes.POINTER(ZngStream), ctypes.c_int], ctypes.c_int
    except (ImportError, OSError, AttributeError):   # wheel missing, or a build that hides zng_*
        return None
    return Backend("zlib-ng", lib.zlibng_version().decode(), ZngStream, init, f["inflate"], f["inflateEnd"],
                   f["inflateReset2"], f["inflatePrime"], f["inflateSetDictionary"])


def _zlib() -> Backend:
    try:
        lib = ctypes.CDLL("libz.so.1")
    except OSError:  # non-Debian layouts
        name = ctypes.util.find_library("z")
        if not name:
            raise FormatError("neither zlib-ng nor libz (zlib1g) is available: cannot index gzip layers") from None
        lib = ctypes.CDLL(name)
    lib.zlibVersion.restype = ctypes.c_char_p
    version = lib.zlibVersion()
    f = _bind(lib, "", ZStream)
    init2 = lib.inflateInit2_
    init2.argtypes = [ctypes.POINTER(ZStream), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    init2.restype = ctypes.c_int

    def init(strm, window_bits: int) -> int:
        return init2(strm, window_bits, version, ctypes.sizeof(ZStream))

    return Backend("zlib", version.decode(), ZStream, init, f["inflate"], f["inflateEnd"],
                   f["inflateReset2"], f["inflatePrime"], f["inflateSetDictionary"])


def load_backend(name: str | None = None) -> Backend:
    """The named backend, or the fastest available."""
    if name in (None, "", "zlib-ng"):
        ng = _zlib_ng()
        if ng is not None:
            return ng
        if name == "zlib-ng":
            raise FormatError("the zlib-ng backend was asked for but the zlib-ng package does not provide it")
    elif name != "zlib":
        raise FormatError(f"unknown inflate backend {name!r} (want zlib or zlib-ng)")
    return _zlib()


BACKEND = load_backend(os.environ.get("LAZYOCI_INFLATE"))


class Inflater:
    """One inflate stream. Callers set next_in/avail_in/next_out/avail_out on `.s` directly
    (attribute access on a ctypes Structure is cheap; no copies of the data)."""

    def __init__(self, window_bits: int, backend: Backend | None = None) -> None:
        self.b = b = backend or BACKEND
        self.s = b.stream()
        self._ptr = ctypes.byref(self.s)
        self._open = False
        rc = b.init(self._ptr, window_bits)
        if rc != Z_OK:
            raise FormatError(f"{b.name} inflateInit2 failed ({rc})")
        self._open = True

    def inflate(self, flush: int) -> int:
        """One inflate call; data errors become FormatError with the library's message."""
        rc = self.b.inflate(self._ptr, flush)
        if rc < 0 and rc != Z_BUF_ERROR or rc == Z_NEED_DICT:
            msg = self.s.msg.decode(errors="replace") if self.s.msg else f"error {rc}"
            raise FormatError(f"corrupt deflate data: {msg}")
        return rc

    def reset(self, window_bits: int) -> None:
        if self.b.reset2(self._ptr, window_bits) != Z_OK:
            raise FormatError("inflateReset2 failed")

    def prime(self, bits: int, value: int) -> None:
        if self.b.prime(self._ptr, bits, value) != Z_OK:
            raise FormatError("inflatePrime failed")

    def set_dictionary(self, window: bytes) -> None:
        if self.b.set_dictionary(self._ptr, window, len(window)) != Z_OK:
            raise FormatError("inflateSetDictionary failed")

    def close(self) -> None:
        if self._open:
            self.b.end(self._ptr)
            self._open = False

    def __del__(self) -> None:
        self.close()
