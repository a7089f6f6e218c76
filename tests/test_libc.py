"""libc is loaded once (lazyoci/libc.py) and its wrappers report failures as OSError."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

import lazyoci
from lazyoci import libc
from lazyoci.fs.workers import WriteBehind

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


def _comm(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().rstrip("\n")


def test_a_thread_shows_the_system_its_python_name():
    seen = {}

    def named() -> None:
        libc.name_this_thread()
        seen["named"] = _comm(threading.get_native_id())

    def unnamed() -> None:
        seen["unnamed"] = _comm(threading.get_native_id())

    for target, name in ((named, "lazyoci-cache-writer-of-layers"), (unnamed, "lazyoci-other")):
        t = threading.Thread(target=target, name=name)
        t.start()
        t.join(10)
    # the prefix dropped, cut to the kernel's 15 bytes; a thread not named inherits its creator's name
    assert seen == {"named": "cache-writer-of", "unnamed": _comm(threading.get_native_id())}


def test_the_span_cache_writer_shows_its_name():
    writer = WriteBehind(100)
    ids = []
    writer.submit(lambda: ids.append(threading.get_native_id()), 1)
    writer.flush()
    assert _comm(ids[0]) == "cache-writer"
