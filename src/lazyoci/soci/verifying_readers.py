"""File-like adaptors that let the zTOC builder read layers it must not trust blindly.

`build_ztoc` wants a binary file object; layers come from the blob store (a file)
or from a registry (an iterator of chunks). Both are wrapped so that the layer's
digest and size are checked once every byte has passed: a zTOC is only kept
for a layer whose bytes were the ones named.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import BinaryIO

from lazyoci.oci.digest import DigestVerifier


class VerifyingReader(io.RawIOBase):
    """Reads from `source` (a file object or an iterator of chunks), hashing as it goes.

    `finish()` drains what the consumer left unread and raises IntegrityError if
    the size or digest is wrong.
    """

    def __init__(self, source: BinaryIO | Iterator[bytes], digest: str, size: int | None,
                 what: str = "layer") -> None:
        super().__init__()
        self._file = source if hasattr(source, "read") else None
        self._chunks: Iterator[bytes] = iter(()) if self._file is not None else iter(source)
        self._pending = memoryview(b"")
        self._verifier = DigestVerifier(digest, size, what)
        self._eof = False

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bytes:
        if self._file is not None:
            return self._file.read(1 << 20)
        for chunk in self._chunks:      # an empty chunk mid-stream is not the end
            if chunk:
                return chunk
        return b""

    def readinto(self, b) -> int:
        if not self._pending:
            if self._eof:
                return 0
            chunk = self._next_chunk()
            if not chunk:
                self._eof = True
                return 0
            self._verifier.update(chunk)
            self._pending = memoryview(chunk)
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def finish(self) -> None:
        """Read the rest (unverified bytes must not pass silently) and verify."""
        self._pending = memoryview(b"")
        while not self._eof:
            chunk = self._next_chunk()
            if not chunk:
                self._eof = True
                break
            self._verifier.update(chunk)
        self._verifier.finish()

    @property
    def count(self) -> int:
        return self._verifier.count


def buffered(reader: VerifyingReader, size: int = 1 << 20) -> io.BufferedReader:
    """A buffered view (so that small reads do not each cost a Python call)."""
    return io.BufferedReader(reader, buffer_size=size)
