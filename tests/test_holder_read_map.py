"""The FUSE session holder's answer to a READ from a layer's read map and span states
(service/holder_reads.py), against a pipe standing in for `/dev/fuse`: which READs it answers
itself, byte for byte, and which it leaves to the service."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

from lazyoci.service.holder_reads import (COMPLETE, NO_XATTRS, OPAQUE, SLOT_SHIFT, SPAN_CACHED, SPAN_READ, STOPPED,
                                          ReadMap, ServedReads, entry_out)

SPAN = 1000
LAYER = bytes(range(256)) * 20          # 5120 bytes: six spans of 1000, the last one 120
BOUNDS = list(range(0, len(LAYER), SPAN)) + [len(LAYER)]
SLOT = 3


def _read_message(node: int, offset: int, size: int, unique: int = 7) -> bytearray:
    """A READ request as the kernel sends it: struct fuse_in_header, then struct fuse_read_in."""
    header = struct.pack("<IIQQIIII", 40 + 40, 15, unique, (SLOT << SLOT_SHIFT) | (node + 1), 0, 0, 0, 0)
    return bytearray(header + struct.pack("<QQIIIIQ", 0, offset, size, 0, 0, 0, 0).ljust(40, b"\0"))


class _Layer:
    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "data").write_bytes(LAYER)
        self.read_map = ReadMap.create(4, BOUNDS, 3600)
        self.states_fd = os.memfd_create("states")
        os.ftruncate(self.states_fd, len(BOUNDS) - 1)
        self.states = mmap.mmap(self.states_fd, len(BOUNDS) - 1)
        self.reads = ServedReads()
        data_fd = os.open(tmp_path / "data", os.O_RDONLY)
        self.reads.serve(SLOT, data_fd, self.states_fd, self.read_map.fd)
        self.r, self.w = os.pipe()

    def ask(self, node: int, offset: int, size: int) -> bytes | None:
        """The answer's data, or None if the READ is left to the service."""
        nodeid = (SLOT << SLOT_SHIFT) | (node + 1)
        if not self.reads.answer(self.w, _read_message(node, offset, size), nodeid, 7):
            return None
        reply = os.read(self.r, 1 << 20)
        length, error, unique = struct.unpack_from("<IiQ", reply)
        assert (length, error, unique) == (len(reply), 0, 7)
        return reply[16:]

    def close(self) -> None:
        self.reads.clear()
        for fd in (self.r, self.w, self.states_fd):
            os.close(fd)
        self.states.close()
        self.read_map.close()


@pytest.fixture
def layer(tmp_path: Path):
    served = _Layer(tmp_path)
    yield served
    served.close()


def test_a_file_is_answered_only_once_published_and_its_spans_read(layer):
    layer.read_map.publish(1, 1500, 800)        # spans 1 and 2
    assert layer.ask(0, 0, 100) is None, "a file whose first READ the service has not answered"
    assert layer.ask(1, 0, 800) is None, "spans not cached"
    layer.states[1] = layer.states[2] = SPAN_CACHED
    assert layer.ask(1, 0, 800) is None, "spans cached, but no read of them has reached the service"
    layer.states[1] = SPAN_READ
    assert layer.ask(1, 0, 100) == LAYER[1500:1600], "a READ inside span 1 alone"
    assert layer.ask(1, 0, 800) is None, "a READ that reaches span 2"
    layer.states[2] = SPAN_READ
    assert layer.ask(1, 0, 800) == LAYER[1500:2300]
    assert layer.ask(1, 790, 100) == LAYER[2290:2300], "cut at the end of the file"
    assert layer.ask(1, 800, 100) == b"" and layer.ask(1, 5000, 10) == b""
    assert layer.reads.answered == 5 and layer.reads.bytes == 100 + 800 + 10


def test_a_file_that_goes_on_needs_its_next_span_cached(layer):
    layer.read_map.publish(2, 100, 2000)        # spans 0, 1 and 2
    layer.states[0] = SPAN_READ
    assert layer.ask(2, 0, 500) is None, "the service would fetch span 1 now"
    layer.states[1] = SPAN_CACHED
    assert layer.ask(2, 0, 500) == LAYER[100:600]
    layer.read_map.publish(3, 4100, 1020)       # spans 4 and 5: the file ends with the layer
    layer.states[5] = SPAN_READ
    assert layer.ask(3, 900, 200) == LAYER[5000:5120]


def test_complete_answers_every_published_file_and_stopped_none(layer):
    layer.read_map.publish(1, 0, len(LAYER))
    assert layer.ask(1, 0, len(LAYER)) is None
    layer.read_map.set_flag(COMPLETE)
    assert layer.ask(1, 0, len(LAYER)) == LAYER
    assert layer.ask(0, 0, 10) is None, "a node with no place written is never answered"
    layer.read_map.set_flag(STOPPED)
    assert layer.ask(1, 0, 10) is None, "a broken layer"
    layer.read_map.set_flag(STOPPED, False)
    layer.read_map.set_flag(COMPLETE, False)
    assert layer.read_map.flags == 0 and layer.ask(1, 0, 10) is None


def test_other_slots_and_withdrawn_layers_go_to_the_service(layer):
    layer.read_map.set_flag(COMPLETE)
    layer.read_map.publish(1, 0, 10)
    message = _read_message(1, 0, 10)
    assert not layer.reads.answer(layer.w, message, ((SLOT + 1) << SLOT_SHIFT) | 2, 7)
    assert layer.reads.withdraw(SLOT) and not layer.reads.withdraw(SLOT)
    assert layer.ask(1, 0, 10) is None


def test_a_map_too_small_for_what_it_claims_is_refused(tmp_path):
    fd = os.memfd_create("bad")
    try:
        os.ftruncate(fd, 64)
        os.pwrite(fd, struct.pack("<4q", 0, 1000, 10, 0), 0)
        data_fd = os.open(tmp_path, os.O_RDONLY)
        with pytest.raises(OSError, match="read map"):
            ServedReads().serve(1, data_fd, fd, fd)
        with pytest.raises(OSError):
            os.fstat(data_fd)          # the data descriptor was closed with the refusal
    finally:
        os.close(fd)


def _lookup_message(node: int, name: bytes, unique: int = 9) -> bytearray:
    body = name + b"\0"
    header = struct.pack("<IIQQIIII", 40 + len(body), 1, unique, (SLOT << SLOT_SHIFT) | (node + 1), 0, 0, 0, 0)
    return bytearray(header + body)


def _ask_lookup(layer, node: int, name: bytes) -> bytes | None:
    message = _lookup_message(node, name)
    nodeid = (SLOT << SLOT_SHIFT) | (node + 1)
    if not layer.reads.answer_lookup(layer.w, message, len(message), nodeid, 9):
        return None
    reply = os.read(layer.r, 4096)
    length, error, unique = struct.unpack_from("<IiQ", reply)
    assert (length, error, unique) == (len(reply), 0, 9)
    return reply[16:]


def test_a_listed_directory_answers_its_absent_names_and_leaves_the_others_to_the_service(layer):
    names = [b"a", b"bb", b"lib7.so"]
    assert _ask_lookup(layer, 0, b"nope") is None, "not listed yet"
    layer.read_map.list_directory(0, [(name, i + 1) for i, name in enumerate(names)])
    assert layer.read_map.listed(0) and not layer.read_map.listed(1)
    entry = _ask_lookup(layer, 0, b"nope")
    assert entry is not None and len(entry) == 128
    nodeid, generation, entry_valid = struct.unpack_from("<QQQ", entry)
    assert (nodeid, generation, entry_valid) == (0, 0, 3600), "no node, remembered as the service says"
    for name in names + [b".", b".."]:
        assert _ask_lookup(layer, 0, name) is None, name
    assert _ask_lookup(layer, 1, b"nope") is None, "a directory not listed"
    assert _ask_lookup(layer, 0, b"f1000") is not None and layer.reads.lookups == 2
    layer.read_map.list_directory(1, [(b"n%d" % i, 2) for i in range(1000)])     # more than the layer's nodes
    assert not layer.read_map.listed(1) and _ask_lookup(layer, 1, b"nope") is None
    layer.read_map.set_flag(STOPPED)
    assert _ask_lookup(layer, 0, b"nope") is None


class _Attrs:
    """Attributes named as pyfuse3's EntryAttributes names them."""

    def __init__(self, **fields) -> None:
        defaults = dict(st_ino=(SLOT << SLOT_SHIFT) | 2, generation=0, entry_timeout=86400.0, attr_timeout=86400.0,
                        st_size=5, st_blocks=1, st_atime_ns=1_700_000_000_123_456_789,
                        st_mtime_ns=1_700_000_000_123_456_789, st_ctime_ns=1_700_000_000_123_456_789,
                        st_mode=0o100644, st_nlink=1, st_uid=1000, st_gid=1000, st_rdev=0, st_blksize=4096)
        self.__dict__.update(defaults, **fields)


def test_an_entry_is_struct_fuse_entry_out_field_for_field():
    entry = entry_out(_Attrs(entry_timeout=1.5, st_rdev=(1 << 40) | 7))
    assert entry is not None and len(entry) == 128
    nodeid, generation, entry_valid, attr_valid, entry_nsec, attr_nsec = struct.unpack_from("<QQQQII", entry)
    assert (nodeid, generation, entry_valid, attr_valid, entry_nsec, attr_nsec) == \
        ((SLOT << SLOT_SHIFT) | 2, 0, 1, 86400, 500_000_000, 0)
    fields = struct.unpack_from("<QQQQQQIIIIIIIIII", entry, 40)
    assert fields == ((SLOT << SLOT_SHIFT) | 2, 5, 1, 1_700_000_000, 1_700_000_000, 1_700_000_000,
                      123_456_789, 123_456_789, 123_456_789, 0o100644, 1, 1000, 1000, 7, 4096, 0)
    assert entry_out(_Attrs(st_mtime_ns=-1)) is None, "a time before 1970 is the service's to answer"


def test_a_listed_directory_answers_the_names_whose_entries_are_written(layer):
    m = layer.read_map
    m.list_directory(0, [(b"a", 1), (b"b", 2)])
    assert _ask_lookup(layer, 0, b"a") is None, "not checked yet: the service checks it first"
    entry = entry_out(_Attrs())
    m.publish_entry(1, entry, 0)
    assert m.entry_published(1) and not m.entry_published(2)
    assert _ask_lookup(layer, 0, b"a") == entry
    assert _ask_lookup(layer, 0, b"b") is None
    m.publish_entry(1, entry_out(_Attrs(st_size=9)), 0)
    assert _ask_lookup(layer, 0, b"a") == entry, "written once: a node's attributes never change"
    m.set_flag(STOPPED)
    assert _ask_lookup(layer, 0, b"a") is None


def test_names_that_share_a_hash_are_left_to_the_service(layer, monkeypatch):
    from lazyoci.service import holder_reads
    monkeypatch.setattr(holder_reads, "_name_hash", lambda key, d, name: 12345)
    m = layer.read_map
    m.list_directory(0, [(b"a", 1), (b"b", 2)])
    m.publish_entry(1, entry_out(_Attrs()), 0)
    m.publish_entry(2, entry_out(_Attrs()), 0)
    assert _ask_lookup(layer, 0, b"a") is None and _ask_lookup(layer, 0, b"b") is None
    assert _ask_lookup(layer, 0, b"c") is None, "a hash that names a listed name: the service says"


def test_each_map_hashes_names_with_a_key_of_its_own():
    one, two = ReadMap.create(4, BOUNDS, 60), ReadMap.create(4, BOUNDS, 60)
    try:
        assert len(one.key) == 16 and one.key != two.key
    finally:
        one.close()
        two.close()


def _getxattr_message(node: int, name: bytes, size: int, unique: int = 11) -> bytearray:
    body = struct.pack("<II", size, 0) + name + b"\0"
    header = struct.pack("<IIQQIIII", 40 + len(body), 22, unique, (SLOT << SLOT_SHIFT) | (node + 1), 0, 0, 0, 0)
    return bytearray(header + body)


def _ask_getxattr(layer, node: int, name: bytes, size: int) -> tuple[int, bytes] | None:
    message = _getxattr_message(node, name, size)
    if not layer.reads.answer_getxattr(layer.w, message, len(message), (SLOT << SLOT_SHIFT) | (node + 1), 11):
        return None
    reply = os.read(layer.r, 4096)
    length, error, unique = struct.unpack_from("<IiQ", reply)
    assert (length, unique) == (len(reply), 11)
    return error, reply[16:]


def test_the_opaque_marker_is_answered_for_nodes_whose_entries_are_written(layer):
    m = layer.read_map
    opaque = b"trusted.overlay.opaque"
    assert _ask_getxattr(layer, 1, opaque, 0) is None, "not checked yet"
    m.publish_entry(1, entry_out(_Attrs()), OPAQUE)
    m.publish_entry(2, entry_out(_Attrs()), 0)
    assert _ask_getxattr(layer, 1, opaque, 0) == (0, struct.pack("<II", 1, 0)), "the size first"
    assert _ask_getxattr(layer, 1, opaque, 64) == (0, b"y")
    assert _ask_getxattr(layer, 2, opaque, 64) == (-61, b""), "ENODATA"
    assert _ask_getxattr(layer, 1, b"security.capability", 64) is None, "other names: the service"
    assert _ask_getxattr(layer, 3, opaque, 64) is None
    m.set_flag(NO_XATTRS)
    assert _ask_getxattr(layer, 3, opaque, 64) == (-61, b""), "a layer without xattrs has none to check"
    assert _ask_getxattr(layer, 1, opaque, 64) == (-61, b"")
    m.set_flag(STOPPED)
    assert _ask_getxattr(layer, 2, opaque, 64) is None


def test_an_entry_keeps_three_different_times_apart():
    """A sweep's entries have one time for all three, which is divided once; others each their own."""
    entry = entry_out(_Attrs(st_atime_ns=1_000_000_000_000_000_001, st_mtime_ns=2_000_000_000_000_000_002,
                             st_ctime_ns=3, attr_timeout=0.25))
    assert entry is not None
    assert struct.unpack_from("<QQQQII", entry)[2:] == (86400, 0, 0, 250_000_000)
    assert struct.unpack_from("<QQQIII", entry, 64) == (1_000_000_000, 2_000_000_000, 0, 1, 2, 3)
    assert entry_out(_Attrs(st_ctime_ns=-5)) is None and entry_out(_Attrs(st_atime_ns=-1)) is None
