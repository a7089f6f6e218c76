"""Byte streams under the tar reader: download chunks in, inflated and hashed bytes out.

    chunks/file -> open_decompressed (oci/compression.py: isal gzip incl. multi-member, zstd, none)
                -> PrefetchReader (inflate + sha256 + count in a thread of its own: the diff ID and size)
                -> ForwardFile (the seek/tell tarfile wants, over a forward-only stream)
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from typing import BinaryIO


class ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (the download stream)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._it = iter(chunks)
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            try:
                self._buf = memoryview(next(self._it))
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class PrefetchReader(io.RawIOBase):
    """Decompresses and hashes in a thread of its own, ahead of the tar parser.

    Inflate and sha256 release the GIL, so on two cores they overlap with the
    (Python) work of creating files. A bounded queue keeps memory at a few MiB.
    `size` counts the uncompressed bytes: the layer's size without a second inflate.
    """

    def __init__(self, stream: BinaryIO, chunk: int = 1 << 20, depth: int = 8) -> None:
        import queue
        import threading

        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stream = stream
        self._chunk = chunk
        self.sha = hashlib.sha256()
        self.size = 0
        self._error: BaseException | None = None
        self._stop = False
        self._buf = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="layer-inflate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop:
                chunk = self._stream.read(self._chunk)
                if not chunk:
                    break
                self.sha.update(chunk)
                self.size += len(chunk)
                self._q.put(chunk)
        except BaseException as e:  # handed to the reading thread
            self._error = e
        self._q.put(None)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if not self._buf:
            if self._eof:
                return b""
            item = self._q.get()
            if item is None:
                self._eof = True
                self._thread.join()
                if self._error is not None:
                    raise self._error
                return b""
            self._buf = memoryview(item)
        n = len(self._buf) if n is None or n < 0 else n
        out = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return out

    def close(self) -> None:
        """Stop the thread (after an error in the tar): drain so that it can finish."""
        self._stop = True
        while not self._eof:
            if self._q.get() is None:
                self._eof = True
        self._thread.join()
        super().close()


class ForwardFile:
    """A read-only file over a stream that can `seek` forward (and back within the last block).

    tarfile's random-access mode ("r:") wants seek/tell but only ever moves forward
    (plus one byte back at the end of an archive); its stream mode ("r|") copies its
    whole buffer on every small read, which made unpacking twice as slow.
    """

    _KEEP = 512

    def __init__(self, raw: BinaryIO | io.RawIOBase) -> None:
        self._raw = raw
        self._buf = b""
        self._off = 0           # read position inside _buf
        self._base = 0          # absolute position of _buf[0]

    def tell(self) -> int:
        return self._base + self._off

    def _fill(self) -> bool:
        chunk = self._raw.read(1 << 20)
        if not chunk:
            return False
        keep = self._buf[max(0, len(self._buf) - self._KEEP):]
        self._base += len(self._buf) - len(keep)
        self._buf = keep + chunk
        self._off = len(keep)
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self._buf[self._off:]]
            self._off = len(self._buf)
            while self._fill():
                parts.append(self._buf[self._off:])
                self._off = len(self._buf)
            return b"".join(parts)
        end = self._off + n
        if end <= len(self._buf):
            out = self._buf[self._off:end]
            self._off = end
            return out
        parts = [self._buf[self._off:]]
        need = n - len(parts[0])
        self._off = len(self._buf)
        while need > 0 and self._fill():
            piece = self._buf[self._off:self._off + need]
            self._off += len(piece)
            need -= len(piece)
            parts.append(piece)
        return b"".join(parts)

    def drain(self) -> None:
        """Read to the end without keeping anything (trailing data may be large)."""
        self._off = len(self._buf)
        while self._fill():
            self._off = len(self._buf)

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self.tell()
        elif whence != 0:
            raise OSError("cannot seek from the end of a stream")
        if pos < self._base:
            raise OSError("cannot seek backwards in a stream")
        while pos > self._base + len(self._buf):
            self._off = len(self._buf)
            if not self._fill():
                break
        self._off = min(pos - self._base, len(self._buf))
        return self.tell()

