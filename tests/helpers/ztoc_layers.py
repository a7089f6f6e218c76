"""Layers the zTOC tests share (no tests here). Tar streams are made by Python's tarfile,
compressed by gzip/pigz, so what lazyoci indexes is produced by other tools."""

from __future__ import annotations

import gzip
import io
import random
import subprocess
import tarfile

from helpers.images import Entry, tar_bytes

SMALL_SPAN = 64 << 10   # many spans from small layers keeps the tests fast


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def text(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghij klmnop") for _ in range(rnd.randint(2, 9))) for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


def all_types_entries() -> list[Entry]:
    """Every entry type, long names (PAX path/linkpath), PAX records, sizes across many spans."""
    long_dir = "deep/" + "d" * 120
    return [
        Entry("etc", "dir"),
        Entry("etc/hostname", data=b"lazy\n", mode=0o644, uid=1000, gid=1000),
        Entry("etc/empty", data=b""),
        Entry("bin", "dir"),
        Entry("bin/big-text", data=text(700_000, 1), mode=0o755),
        Entry("bin/big-noise", data=noise(500_000, 2), mode=0o755),
        Entry("bin/sh", "symlink", linkname="big-text"),
        Entry("bin/hard", "hardlink", linkname="bin/big-text"),
        Entry("dev", "dir"),
        Entry("dev/null", "char", devmajor=1, devminor=3, mode=0o666),
        Entry("dev/sda", "block", devmajor=8, devminor=0, mode=0o660),
        Entry("run/fifo", "fifo", mode=0o600),
        Entry(long_dir, "dir"),
        Entry(long_dir + "/" + "f" * 150, data=text(90_000, 3)),
        Entry("links/long-symlink", "symlink", linkname="/" + "t" * 200),
        Entry("xattr-file", data=b"with xattrs",
              pax={"SCHILY.xattr.user.comment": "hello", "SCHILY.xattr.security.capability": "cap",
                   "LAZYOCI.custom": "value"}),
        Entry("fractional-mtime", data=b"x", pax={"mtime": "1700000000.123456789"}),
        Entry("unicod\u00e9/\u65e5\u672c", data=text(3000, 4)),
        Entry("tail/after-noise", data=noise(130_000, 5) + text(200_000, 6)),
    ]


def all_types_tar(fmt: int = tarfile.PAX_FORMAT) -> bytes:
    return tar_bytes(all_types_entries(), format=fmt)


def gzip_members(raw: bytes, cuts: list[int]) -> bytes:
    """Concatenated gzip members split at `cuts` (as mgzip or `cat a.gz b.gz` make them)."""
    bounds = [0, *cuts, len(raw)]
    return b"".join(gzip.compress(raw[a:b], compresslevel=6, mtime=0) for a, b in zip(bounds, bounds[1:]))


def pigz(raw: bytes, *flags: str) -> bytes:
    return subprocess.run(["pigz", "-c", "-6", *flags], input=raw, capture_output=True, check=True).stdout


def members(raw: bytes) -> list[tarfile.TarInfo]:
    return tarfile.open(fileobj=io.BytesIO(raw)).getmembers()


TYPES = {tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
         tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
         tarfile.FIFOTYPE: "fifo"}

__all__ = ["SMALL_SPAN", "noise", "text", "all_types_entries", "all_types_tar", "gzip_members", "pigz",
           "members", "TYPES"]


def archive_end(raw: bytes) -> int:
    """Where Go's reader stops in a tar tarfile wrote: after the last member and the two
    end-of-archive blocks, before tarfile's padding to a 10 KiB record."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        tf.getmembers()
        end = tf.offset + 1024
    assert raw[end - 1024:].count(0) == len(raw) - end + 1024
    return end
