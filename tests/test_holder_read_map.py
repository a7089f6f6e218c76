"""The FUSE session holder's answer to a READ from a layer's read map and span states
(service/holder_reads.py), against a pipe standing in for `/dev/fuse`: which READs it answers
itself, byte for byte, and which it leaves to the service."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

from lazyoci.service.holder_reads import COMPLETE, SLOT_SHIFT, SPAN_CACHED, SPAN_READ, STOPPED, ReadMap, ServedReads

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
    layer.read_map.list_directory(0, names)
    assert layer.read_map.listed(0) and not layer.read_map.listed(1)
    entry = _ask_lookup(layer, 0, b"nope")
    assert entry is not None and len(entry) == 128
    nodeid, generation, entry_valid = struct.unpack_from("<QQQ", entry)
    assert (nodeid, generation, entry_valid) == (0, 0, 3600), "no node, remembered as the service says"
    for name in names + [b".", b".."]:
        assert _ask_lookup(layer, 0, name) is None, name
    assert _ask_lookup(layer, 1, b"nope") is None, "a directory not listed"
    assert _ask_lookup(layer, 0, b"f1000") is not None and layer.reads.lookups == 2
    layer.read_map.list_directory(1, [b"n%d" % i for i in range(1000)])     # more than the layer's nodes
    assert not layer.read_map.listed(1) and _ask_lookup(layer, 1, b"nope") is None
    layer.read_map.set_flag(STOPPED)
    assert _ask_lookup(layer, 0, b"nope") is None
