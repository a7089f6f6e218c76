"""libc is loaded once (lazyoci/libc.py) and its wrappers report failures as OSError."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import lazyoci
from lazyoci import libc

SRC = Path(lazyoci.__file__).parent


def test_only_one_module_loads_libc():
    loaders = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
               if 'find_library("c")' in p.read_text() or "libc.so" in p.read_text()]
    assert loaders == ["libc.py"]


def test_fallocate_punches_a_hole(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"x" * (1 << 20))
    fd = os.open(path, os.O_RDWR)
    try:
        libc.fallocate(fd, 0x01 | 0x02, 0, 1 << 16)     # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
        assert os.pread(fd, 1 << 16, 0) == bytes(1 << 16)
        assert os.pread(fd, 1, 1 << 16) == b"x" and os.fstat(fd).st_size == 1 << 20
    finally:
        os.close(fd)


def test_a_failed_call_is_an_oserror_with_its_errno(tmp_path):
    with pytest.raises(OSError) as e:
        libc.fallocate(-1, 0, 0, 1)
    assert e.value.errno == errno.EBADF
    with pytest.raises(OSError) as e:
        libc.umount2(str(tmp_path / "not-there"), 0)
    assert e.value.errno in (errno.ENOENT, errno.EPERM)
