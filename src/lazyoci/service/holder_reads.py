"""READs the FUSE session holder answers itself, from the span cache, for layers the service hands it.

A warm `run` is mostly READs of files whose every span is in the disk cache, and each one
went kernel → holder → service → holder → kernel, its data copied four times. Once a layer
is complete in the span cache and every tar header of it matched its index, nothing about
serving its files can change any more: the service then gives the holder the layer's cache
data file and where each file's bytes lie in it (service/holder_offers.py), and the holder
answers READs of that layer's nodes with one `pread` and one write to `/dev/fuse`.

What keeps it exact: the service takes a layer back (`withdraw`) before it changes a byte of
its data file (eviction punches holes, a purge deletes it) or stops serving the view, and it
waits for the holder's answer; the holder drops every layer when the service that handed it
over detaches, and the next service hands over what it finds complete. Nodes the holder has
no extent for (directories, symlinks, hardlink names, another slot) still go to the service.

The extents are one array of 64-bit integers, two per node of the layer's tree (the tar offset
of the file's data and its size, size -1 for a node that is not a regular file the kernel can
read), handed over in a memfd: node n of the layer in slot s is the kernel's node ID
(s << 32) | (n + 1) (fs/layer_fs.py). This module imports only the standard library: the holder
is kept small.
"""

from __future__ import annotations

import os
import struct
from array import array

__all__ = ["ServedReads", "EXTENT_TYPECODE", "SLOT_SHIFT"]

EXTENT_TYPECODE = "q"                  # two per node: offset in the tar stream, size (-1: not served)
_IN_HEADER_SIZE = 40                   # struct fuse_in_header
_READ_IN = struct.Struct("<QQI")       # struct fuse_read_in: fh, offset, size, ...
_OUT_HEADER = struct.Struct("<IiQ")    # struct fuse_out_header: len, error, unique
# Node IDs of the lazy mount: (slot << SLOT_SHIFT) | (node + 1). fs/layer_fs.py makes them from this
# constant, so the holder can never read one layout while the service answers another.
SLOT_SHIFT = 32
_NODE_MASK = (1 << SLOT_SHIFT) - 1


class ServedReads:
    """The layers whose READs the holder answers: slot -> (cache data file, extents)."""

    def __init__(self) -> None:
        self._layers: dict[int, tuple[int, array]] = {}
        self.answered = 0                  # READs answered here
        self.bytes = 0                     # and the bytes they returned

    def __len__(self) -> int:
        return len(self._layers)

    def serve(self, slot: int, data_fd: int, extents_fd: int) -> None:
        """Answer READs of the layer in `slot` from `data_fd`; takes both descriptors (the extents
        one is read and closed here; both are closed if it cannot be read: OSError)."""
        try:
            raw = _read_all(extents_fd)
        except OSError:
            os.close(data_fd)
            raise
        finally:
            os.close(extents_fd)
        extents = array(EXTENT_TYPECODE)
        extents.frombytes(raw[:len(raw) - len(raw) % (2 * extents.itemsize)])
        self.withdraw(slot)
        self._layers[slot] = (data_fd, extents)

    def withdraw(self, slot: int) -> bool:
        """Stop answering READs of the layer in `slot`; False if it was not served."""
        served = self._layers.pop(slot, None)
        if served is None:
            return False
        os.close(served[0])
        return True

    def clear(self) -> None:
        for slot in list(self._layers):
            self.withdraw(slot)

    def answer(self, fuse_fd: int, message: bytearray, nodeid: int, unique: int) -> bool:
        """Answer a READ (`message`, its header included) of a served node on `fuse_fd`; False to
        leave it to the service."""
        served = self._layers.get(nodeid >> SLOT_SHIFT)
        if served is None:
            return False
        data_fd, extents = served
        n = (nodeid & _NODE_MASK) - 1
        if not 0 <= 2 * n < len(extents) or extents[2 * n + 1] < 0:
            return False
        start, size = extents[2 * n], extents[2 * n + 1]
        _, offset, want = _READ_IN.unpack_from(message, _IN_HEADER_SIZE)
        count = max(0, min(want, size - offset))
        try:
            data = os.pread(data_fd, count, start + offset) if count else b""
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


def _read_all(fd: int) -> bytes:
    parts: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        offset += len(chunk)
