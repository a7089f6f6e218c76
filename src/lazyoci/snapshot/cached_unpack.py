"""Unpack a lazy layer that is whole in the span cache into the soci snapshotter's directories.

A container stacked on a FUSE view pays a round trip to the service (or the session holder)
for every lookup, xattr query and read of the layer; one stacked on an unpacked directory
pays none. Once every span of a zTOC layer is cached, the cache's `data` file is the layer's
uncompressed tar, so it unpacks as a downloaded layer does, through the same safe unpacker.

What proves the result is the diff ID, not the zTOC: the tar must hash to the diff ID that
the image config (verified through the manifest) gives the layer, or nothing is kept. A
zTOC's checkpoints decide what the compressed spans inflate to, so span digests alone would
not do. A cache file changed under the unpack (an eviction) fails the same way. The unpack
only saves time, so it never takes the last of the disk (`default_min_free`).

The cache holds the tar up to its end-of-archive blocks (the zTOC's archive size); what a
writer put after them (Python's and GNU tar's padding to a 10 KiB record) is part of the
diff ID but not of the cache. Zero padding is all a tar writer adds there, so the diff ID is
looked for among the cached bytes followed by 0 to `MAX_PADDING` zero bytes, in whole
blocks; a layer with anything else after its end fails the check and is not unpacked.

The layer's files are flushed to disk (syncfs) before any snapshot points at them, as the span
cache syncs a span before marking it present: after a crash, a snapshot never stacks a
directory of files the disk never got (zero-length or zero-filled, with the right names).
Nobody waits for this unpack, so the flush costs no start its time.

The service runs this in a child process at the lowest CPU priority (`python -m
lazyoci.snapshot.cached_unpack`), so that a workload reading other layers keeps the CPU and
the service's threads keep the interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from lazyoci.errors import IntegrityError, LazyociError, StoreError
from lazyoci.oci.mediatypes import OCI_LAYER_TAR
from lazyoci.snapshot.soci import SociSnapshotter
from lazyoci.snapshot.unpack import apply_layer_stream, remove_tree

if TYPE_CHECKING:
    import hashlib

__all__ = ["MAX_PADDING", "default_min_free", "unpack_cached_layer", "main"]

MAX_PADDING = 1 << 20       # zero bytes after the end-of-archive blocks the diff ID may include
_BLOCK = 512
_CHUNK = 1 << 20            # how much of the cache file is read at a time


def _chunks(f: BinaryIO, size: int) -> Iterator[bytes]:
    """The first `size` bytes of a file (the unpacker reads until the chunks end)."""
    while size > 0 and (data := f.read(min(_CHUNK, size))):
        size -= len(data)
        yield data


def _padded_digest(sha: "hashlib._Hash", wanted: set[str]) -> str:
    """The digest among `wanted` that the hashed bytes followed by whole blocks of zeros (none
    up to MAX_PADDING bytes) have; else the digest of the bytes alone."""
    h, zeros = sha.copy(), bytes(_BLOCK)
    for _ in range(MAX_PADDING // _BLOCK + 1):
        if (digest := "sha256:" + h.hexdigest()) in wanted:
            return digest
        h.update(zeros)
    return "sha256:" + sha.hexdigest()


def default_min_free(path: Path) -> int:
    """The free space an unpack must leave on the filesystem of `path`: 5% of it, at least 1 GiB.
    The unpack only saves time; the span cache, containers and pulls need the room more."""
    st = os.statvfs(path)
    return max(1 << 30, st.f_blocks * st.f_frsize // 20)


def unpack_cached_layer(snapshotter: SociSnapshotter, layer_digest: str, data: Path, size: int,
                        min_free: int | None = None) -> str | None:
    """Unpack the uncompressed tar in the first `size` bytes of `data` and give it to the lazy
    snapshots of `layer_digest` that wait for it; returns its diff ID (None: no snapshot waits).

    Raises IntegrityError when the tar does not hash to a diff ID a waiting snapshot expects
    (nothing is kept), FormatError / UnsafeLayerError for a tar the unpacker refuses, StoreError
    when the unpack would leave less than `min_free` bytes free (default: `default_min_free`)."""
    wanted, _ = SociSnapshotter.waiting_diff_ids(snapshotter.db, layer_digest)
    if not wanted:
        return None
    for diff_id in sorted(wanted):
        if snapshotter.unpacked_dir(diff_id) is not None:     # unpacked before (another image, a pull)
            snapshotter.attach_unpacked(layer_digest, diff_id)
            return diff_id
    st = os.statvfs(snapshotter.dir)
    free, keep = st.f_bavail * st.f_frsize, default_min_free(snapshotter.dir) if min_free is None else min_free
    if free - size < keep:
        raise StoreError(f"layer {layer_digest}: not unpacked: its {size} bytes would leave "
                         f"{max(free - size, 0)} bytes free in {snapshotter.dir}, under {keep}")
    staging = snapshotter.new_staging_dir()
    try:
        with open(data, "rb") as f:
            got = apply_layer_stream(_chunks(f, size), OCI_LAYER_TAR, staging / "fs")
        diff_id = _padded_digest(got.sha, wanted)
        if got.size != size or diff_id not in wanted:
            raise IntegrityError(f"layer {layer_digest}: its cached tar ({got.size} of {size} bytes) "
                                 f"hashes to {diff_id}, with or without zero padding; the image "
                                 f"config says {' or '.join(sorted(wanted))}",
                                 expected=sorted(wanted)[0], actual=diff_id)
    except BaseException:
        remove_tree(staging)
        raise
    snapshotter.adopt_layer(staging, diff_id, layer_digest, flush=True)
    snapshotter.attach_unpacked(layer_digest, diff_id)
    return diff_id


def main(argv: list[str] | None = None) -> int:
    """The child process the service starts: one layer, one line on stderr if it fails."""
    from lazyoci.config import load_config
    from lazyoci.store.layout import DataRoot

    p = argparse.ArgumentParser(prog="python -m lazyoci.snapshot.cached_unpack")
    p.add_argument("--root", required=True)
    p.add_argument("--config")
    p.add_argument("--layer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--size", required=True, type=int)
    args = p.parse_args(argv)
    os.nice(19)              # idle CPU only: a workload may be reading other layers
    try:
        config = load_config(Path(args.config) if args.config else None)
        snapshotter = SociSnapshotter(DataRoot(Path(args.root)), config)
        diff_id = unpack_cached_layer(snapshotter, args.layer, Path(args.data), args.size)
    except (LazyociError, OSError) as e:
        print(f"layer {args.layer}: {e}", file=sys.stderr)
        return 1
    print(diff_id or "", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
