"""Count a layer's uncompressed size while its compressed bytes stream past (for SIZE in `images`).

Decompression runs in bounded steps (max_length), so memory stays flat even
for a layer of zeros. A stream that does not decompress just leaves the size
unknown: the unpacker is the one that rejects broken layers.
"""

from __future__ import annotations

import zlib

try:  # ISA-L inflate is several times faster than zlib; the API is zlib's.
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - isal is a declared dependency
    _zlib = zlib

import zstandard

_STEP = 1 << 20


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)


class UncompressedSize:
    """Feed compressed chunks; `.result` is the uncompressed size, or None if it could not be told."""

    def __init__(self, compression: str) -> None:
        self.compression = compression
        self._count = 0
        self._failed = False
        self._gz = _zlib.decompressobj(31) if compression == "gzip" else None
        self._zcount = _Counter()
        self._zs = (zstandard.ZstdDecompressor().stream_writer(self._zcount, write_size=_STEP)
                    if compression == "zstd" else None)

    def update(self, chunk: bytes) -> None:
        if self._failed:
            return
        try:
            if self.compression == "none":
                self._count += len(chunk)
            elif self._gz is not None:
                self._gzip(chunk)
            elif self._zs is not None:
                self._zs.write(chunk)
        except (zlib.error, _zlib.error, zstandard.ZstdError, ValueError):
            self._failed = True

    def _gzip(self, data: bytes) -> None:
        while data:
            out = self._gz.decompress(data, _STEP)
            self._count += len(out)
            if self._gz.eof:
                # Concatenated gzip members are one valid stream.
                data = self._gz.unused_data
                self._gz = _zlib.decompressobj(31)
                continue
            data = self._gz.unconsumed_tail

    @property
    def result(self) -> int | None:
        if self._failed:
            return None
        if self._zs is not None:
            try:
                self._zs.flush()
            except zstandard.ZstdError:
                return None
            return self._zcount.n
        return self._count
