"""The on-disk span cache: persistence across reopen, layout changes, the size limit."""

from __future__ import annotations

import os
import subprocess

import pytest

from lazyoci.fs import span_cache
from lazyoci.fs.span_cache import LayerCache, SpanCache

SPANS = [(0, 100), (100, 200), (200, 250)]


def _data(i: int) -> bytes:
    s, e = SPANS[i]
    return bytes([65 + i]) * (e - s)


def test_spans_survive_reopen_and_a_new_layout_starts_empty(tmp_path):
    c = LayerCache(tmp_path / "l", "sha256:" + "1" * 64, SPANS)
    c.put(1, _data(1))
    assert c.has(1) and not c.has(0)
    assert c.read_span_range(1, 120, 130) == b"B" * 10
    assert c.read_span_range(0, 0, 10) is None
    c.close()
    again = LayerCache(tmp_path / "l", "sha256:" + "1" * 64, SPANS)
    assert again.has(1) and again.missing() == [0, 2] and again.cached_bytes == 100
    again.close()
    other = LayerCache(tmp_path / "l", "sha256:" + "2" * 64, SPANS)   # another zTOC: bitmap means nothing
    assert other.missing() == [0, 1, 2] and other.cached_bytes == 0
    other.close()


def test_wrong_span_length_is_refused(tmp_path):
    c = LayerCache(tmp_path / "l", "sha256:" + "1" * 64, SPANS)
    with pytest.raises(ValueError):
        c.put(0, b"short")
    assert not c.has(0)
    c.close()


def test_size_limit_evicts_least_recently_used_layer_first(tmp_path):
    cache = SpanCache(tmp_path / "cache", max_bytes=250)
    a = cache.layer("sha256:" + "a" * 64, "sha256:" + "1" * 64, SPANS)
    b = cache.layer("sha256:" + "b" * 64, "sha256:" + "1" * 64, SPANS)
    a.put(0, _data(0))
    a.put(1, _data(1))
    b.put(0, _data(0))                       # 300 > 250: a (older) loses a span
    assert cache.total_bytes <= 250
    assert b.has(0) and len(a.missing()) == 2
    evicted = 1 if not a.has(1) else 0
    assert a.read_span_range(evicted, *SPANS[evicted]) is None
    # the evicted bytes are really given back (a hole), and the bitmap on disk agrees
    present = (tmp_path / "cache" / ("a" * 64 + "-" + "1" * 16) / "present").read_bytes()
    assert present[evicted] == 0
    st = os.stat(tmp_path / "cache" / ("a" * 64 + "-" + "1" * 16) / "data")
    assert st.st_blocks * 512 < 4096 * 2 + 250
    cache.close()


def test_a_cache_directory_of_an_earlier_version_is_kept_for_its_ztoc(tmp_path):
    """Earlier versions keyed a layer's cache by the layer digest alone; its spans stay usable."""
    layer, ztoc = "sha256:" + "a" * 64, "sha256:" + "1" * 64
    old = SpanCache(tmp_path / "cache").layer(layer, ztoc, SPANS)
    old.put(0, b"x" * (SPANS[0][1] - SPANS[0][0]))
    old.close()
    (tmp_path / "cache" / ("a" * 64 + "-" + "1" * 16)).rename(tmp_path / "cache" / ("a" * 64))
    cache = SpanCache(tmp_path / "cache")
    assert cache.layer(layer, ztoc, SPANS).has(0)
    assert not cache.layer("sha256:" + "a" * 64, "sha256:" + "2" * 64, SPANS).has(0)   # another zTOC: its own


def _fincore(path) -> int:
    """Bytes of the file in the page cache (util-linux fincore: mincore over a mapping)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip() or 0)


def test_written_spans_leave_the_page_cache_once_newer_ones_fill_the_window(tmp_path, monkeypatch):
    fs_type = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout
    if fs_type.strip() == "tmpfs":
        pytest.skip("tmpfs keeps a file's pages: they are its data")
    mib = 1 << 20
    monkeypatch.setattr(span_cache, "_WRITTEN", span_cache._WrittenPages(keep=4 * mib, unread=8 * mib))
    spans = [(i * 4 * mib, (i + 1) * 4 * mib) for i in range(5)]
    c = LayerCache(tmp_path / "l", "sha256:" + "1" * 64, spans)
    data = [os.urandom(4 * mib) for _ in spans]
    c.put(0, data[0])
    c.mark_read(0)
    assert _fincore(tmp_path / "l" / "data") == 4 * mib        # the newest span stays
    c.put(1, data[1])
    assert _fincore(tmp_path / "l" / "data") == 4 * mib        # span 0, read, written, synced, given back
    assert c.read_span_range(0, 0, 4 * mib) == data[0]         # and read back from the disk
    c.put(2, data[2])
    c.put(3, data[3])
    assert _fincore(tmp_path / "l" / "data") >= 3 * 4 * mib + 4 * mib, "spans 1 and 2, unread, stay"
    c.put(4, data[4])                                          # past the unread bound: span 1 goes
    pages = _fincore(tmp_path / "l" / "data")
    assert 3 * 4 * mib <= pages < 4 * 4 * mib + 4 * mib, pages
    for i in range(5):
        assert c.read_span_range(i, *spans[i]) == data[i]
    c.close()


def test_header_reads_go_through_chunks_read_once_and_dropped_with_their_span(tmp_path, monkeypatch):
    monkeypatch.setattr(span_cache, "HEADER_CHUNK", 64)
    monkeypatch.setattr(span_cache, "HEADER_CHUNKS", 2)
    c = LayerCache(tmp_path / "l", "sha256:" + "1" * 64, SPANS)
    data = bytes(range(100)) + bytes(range(100, 200))
    c.put(0, data[:100])
    c.put(1, data[100:200])
    reads: list[tuple[int, int]] = []
    real = os.pread
    monkeypatch.setattr(span_cache.os, "pread", lambda fd, n, off: reads.append((off, n)) or real(fd, n, off))
    assert c.read_header_range(1, 130, 140) == data[130:140]       # chunk [128, 192) of span 1
    assert c.read_header_range(1, 150, 190) == data[150:190]
    assert reads == [(128, 64)], "the second read of the chunk came from memory"
    assert c.read_header_range(1, 120, 195) == data[120:195]       # across chunks, cut to the span
    assert reads[1:] == [(100, 28), (192, 8)]
    assert c.read_header_range(0, 10, 20) == data[10:20]           # a third chunk: the oldest goes
    assert c.read_header_range(1, 100, 110) == data[100:110] and len(reads) == 5   # (100, 28) was dropped
    assert c.read_header_range(2, 200, 210) is None                 # not cached: nothing kept
    assert c.read_header_range(1, 130, 140) == data[130:140] and len(reads) == 6
    assert c.evict(100, from_end=True) == 100 and not c.has(1)
    assert c.read_header_range(1, 130, 140) is None, "evicted: no kept chunk serves it"
    assert c.read_header_range(0, 10, 20) == data[10:20]
    c.close()


def test_entry_states_outlive_their_object_and_a_file_that_cannot_be_kept_costs_nothing(tmp_path):
    """Header check states are written through to `entries-checked`; a new object reads them, one
    for another entry count starts afresh, and one whose file cannot be made still holds states."""
    c = LayerCache(tmp_path / "l", "sha256:" + "1" * 64, SPANS)
    states = c.entry_states(5)
    states[3] = 1
    states[-1] = 2
    assert bytes(c.entry_states(5)) == bytes([0, 0, 0, 1, 2])
    states[:] = bytes([1]) * 5
    assert bytes(c.entry_states(5)) == bytes([1]) * 5
    assert bytes(c.entry_states(4)) == bytes(4)          # another zTOC entry count: nothing kept
    c.close()
    lost = span_cache.EntryStates(tmp_path / "no such directory" / "entries-checked", 3)
    lost[1] = 1
    assert bytes(lost) == bytes([0, 1, 0])


def test_entry_states_changed_while_held_reach_the_file_together_when_the_last_hold_ends(tmp_path, monkeypatch):
    """A sweep checks many entries at once: their states are written in one `pwrite` when the
    outermost `held()` block ends (also when it ends by an exception), not one each."""
    c = LayerCache(tmp_path / "l", "sha256:" + "1" * 64, SPANS)
    states = c.entry_states(8)
    writes: list[tuple[int, int]] = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(span_cache.os, "pwrite", lambda fd, data, at: writes.append((at, len(data))) or
                        real_pwrite(fd, data, at))
    with states.held():
        states[2] = 1
        with states.held():
            states[6] = 1
        states[4] = 2
        assert writes == [] and bytes(c.entry_states(8)) == bytes(8), "nothing written while held"
    assert writes == [(2, 5)]
    assert bytes(c.entry_states(8)) == bytes([0, 0, 1, 0, 2, 0, 1, 0])
    with pytest.raises(RuntimeError):
        with states.held():
            states[7] = 1
            raise RuntimeError("a check that failed")
    assert writes[-1] == (7, 1) and c.entry_states(8)[7] == 1
    states[0] = 1                                  # outside a hold: written at once
    assert writes[-1] == (0, 1)
    c.close()
