"""Spans inside large files: longer there, the span size among small files, every byte still
read and verified through the checkpoints, and a zTOC flatc (the reference's schema) decodes."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

import lazyoci.ztoc
from lazyoci.errors import ConfigError, FormatError
from lazyoci.soci.build import SociBuildOptions
from lazyoci.ztoc import Ztoc, build_ztoc, read_range
from lazyoci.ztoc.zinfo import CHECKPOINT_SIZE, HEADER
from helpers.ztoc_layers import noise, text
from test_ztoc_build import check_spans, check_toc

SPAN = 64 << 10
LARGE = 512 << 10
SCHEMA = Path(lazyoci.ztoc.__file__).parent / "schema.fbs"


def _layer(small_files: int) -> bytes:
    """Small files, a large file of noise, small files, a large file of text, one small file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(small_files):
            add(f"small/a{i}", text(9000 + 97 * i, i))
        add("big/noise.bin", noise(3 * LARGE + 12345, 1))
        for i in range(small_files):
            add(f"small/b{i}", text(7000 + 31 * i, 100 + i))
        add("big/text.log", text(4 * LARGE, 2))
        add("tail", text(3000, 3))
    return buf.getvalue()


@pytest.fixture(scope="module")
def layer() -> tuple[bytes, bytes]:
    """A layer of big files: the few small ones hold well under a tenth of its bytes."""
    raw = _layer(4)
    return raw, gzip.compress(raw, 6, mtime=0)


def _spans(z: Ztoc) -> list[tuple[int, int]]:
    return [z.span_uncompressed_range(i) for i in range(z.num_spans)]


def _large_files(z: Ztoc) -> list[tuple[int, int]]:
    """(data start, data end with padding) of the files of at least LARGE bytes."""
    entries = [z.entry(i) for i in range(len(z))]
    return [(e.offset, e.offset + -(-e.size // 512) * 512) for e in entries if e.size >= LARGE]


def _check_layout(z: Ztoc) -> None:
    """Every span ends at the first block end past its due point: inside a large file, in a layer
    whose bytes so far are nine tenths large files' data, up to LARGE stopping SPAN short of the
    file's end; anywhere else after SPAN, as without large-file spans."""
    large = _large_files(z)
    block = 128 << 10      # no deflate block of these streams ends later than this past its due point
    for start, end in _spans(z)[:-1]:
        inside = [b for a, b in large if a <= start < b]
        share = sum(max(0, min(start, b) - a) for a, b in large) / start if start else 0
        due = start + SPAN
        if inside and share >= 0.9:
            due = max(due, min(start + LARGE, inside[0] - SPAN))
        assert due < end <= due + block, (start, end)


def test_spans_run_longer_inside_large_files_only(layer) -> None:
    raw, blob = layer
    uniform_data = build_ztoc(io.BytesIO(blob), "gzip", SPAN)
    uniform = Ztoc.parse(uniform_data)
    data = build_ztoc(io.BytesIO(blob), "gzip", SPAN, large_span_size=LARGE)
    z = Ztoc.parse(data)
    check_toc(z, raw)
    check_spans(z, blob, raw)
    assert read_range(z, lambda a, b: blob[a:b], 0, z.uncompressed_size) == raw[:z.uncompressed_size]
    assert z.span_size == SPAN and z.num_spans < uniform.num_spans
    assert len(uniform_data) - len(data) >= (uniform.num_spans - z.num_spans) * CHECKPOINT_SIZE   # windows
    _check_layout(z)
    assert len(_large_files(z)) == 2
    entries = {z.entry(i).name: z.entry(i) for i in range(len(z))}
    # the header after each large file (a lookup of that file checks it) sits in an ordinary span
    for name in ("small/b0", "tail"):
        header = entries[name].offset - 512
        s, t = next((s, t) for s, t in _spans(z) if s <= header < t)
        assert t - s <= SPAN + (128 << 10), name
    longest = max(t - s for s, t in _spans(z))
    assert SPAN * 2 < longest <= LARGE + (128 << 10)


def test_a_layer_of_many_files_keeps_ordinary_spans_inside_its_large_files() -> None:
    """Large files among many small ones (a shared library among modules) keep ordinary spans."""
    raw = _layer(40)
    blob = gzip.compress(raw, 6, mtime=0)
    data = build_ztoc(io.BytesIO(blob), "gzip", SPAN, large_span_size=LARGE)
    assert data == build_ztoc(io.BytesIO(blob), "gzip", SPAN)
    z = Ztoc.parse(data)
    assert len(_large_files(z)) == 2
    _check_layout(z)


def test_large_file_spans_are_what_block_by_block_inflate_gives(monkeypatch, layer) -> None:
    """Inflating straight through block ends until a checkpoint may be due changes nothing."""
    from lazyoci.ztoc import zinfo
    raw, blob = layer
    built = {}
    for skip in (True, False):
        monkeypatch.setattr(zinfo, "SKIP_UNNEEDED_BLOCK_ENDS", skip)
        built[skip] = build_ztoc(io.BytesIO(blob), "gzip", SPAN, large_span_size=LARGE)
    assert built[True] == built[False]


def test_flatc_decodes_a_ztoc_with_large_file_spans(layer, tmp_path: Path) -> None:
    raw, blob = layer
    data = build_ztoc(io.BytesIO(blob), "gzip", SPAN, large_span_size=LARGE)
    z = Ztoc.parse(data)
    (tmp_path / "ztoc.bin").write_bytes(data)
    subprocess.run(["flatc", "--json", "--raw-binary", "--strict-json", "-o", str(tmp_path), str(SCHEMA),
                    "--", str(tmp_path / "ztoc.bin")], check=True, capture_output=True)
    ci = json.loads((tmp_path / "ztoc.json").read_text())["compression_info"]
    assert ci["max_span_id"] == z.num_spans - 1
    assert ci["span_digests"] == [z.span_digest(i) for i in range(z.num_spans)]
    cp = bytes(ci["checkpoints"])
    assert HEADER.unpack_from(cp) == (z.num_spans, SPAN) and len(cp) == HEADER.size + z.num_spans * CHECKPOINT_SIZE


def test_uncompressed_layers_keep_fixed_spans(layer) -> None:
    raw, _ = layer
    fixed = build_ztoc(io.BytesIO(raw), "none", SPAN)
    assert build_ztoc(io.BytesIO(raw), "none", SPAN, large_span_size=LARGE) == fixed


def test_a_large_file_span_size_at_or_below_the_span_size_changes_nothing(layer) -> None:
    _, blob = layer
    uniform = build_ztoc(io.BytesIO(blob), "gzip", SPAN)
    assert build_ztoc(io.BytesIO(blob), "gzip", SPAN, large_span_size=SPAN) == uniform
    assert build_ztoc(io.BytesIO(blob), "gzip", SPAN, large_span_size=0) == uniform


def test_large_file_span_sizes_past_the_limit_are_refused(layer) -> None:
    _, blob = layer
    with pytest.raises(FormatError, match="inside large files"):
        build_ztoc(io.BytesIO(blob), "gzip", SPAN, large_span_size=65 << 20)
    with pytest.raises(ConfigError, match="large-file span size"):
        SociBuildOptions(large_span_size=65 << 20)
    with pytest.raises(ConfigError, match="large-file span size"):
        SociBuildOptions(large_span_size=-1)


def test_the_library_shortcut_builds_what_soci_create_builds() -> None:
    """`lazyoci.soci.build_ztoc` lays spans out as the index builder does by default: a layer of
    one 40 MiB file gets spans of up to 16 MiB inside it, and 0 turns that off."""
    from lazyoci import soci
    from lazyoci.soci.build import DEFAULT_LARGE_SPAN_SIZE
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = bytes(40 << 20)
        info = tarfile.TarInfo("data/records.dat")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    blob = gzip.compress(buf.getvalue(), 1, mtime=0)
    default = soci.build_ztoc(io.BytesIO(blob))
    assert default == build_ztoc(io.BytesIO(blob), "gzip", 4 << 20, large_span_size=DEFAULT_LARGE_SPAN_SIZE)
    uniform = soci.build_ztoc(io.BytesIO(blob), large_span_size=0)
    assert uniform == build_ztoc(io.BytesIO(blob), "gzip", 4 << 20)
    assert Ztoc.parse(default).num_spans < Ztoc.parse(uniform).num_spans == 10


def test_spans_laid_out_around_recorded_reads_cover_them_closely(layer) -> None:
    """A recorded run's layout (`soci optimize`): the spans its reads touch hold little more than
    those reads, the stretches between are long spans, and every byte still reads back."""
    from lazyoci.soci.recorded_spans import spans_in_read_order
    from lazyoci.ztoc.span_layout import RECORDED_MARGIN, recorded_span_end

    raw, blob = layer
    uniform = Ztoc.parse(build_ztoc(io.BytesIO(blob), "gzip", SPAN))
    big = {e.name: e for e in (uniform.entry(i) for i in range(len(uniform)))}["big/text.log"]
    reads = [(big.offset + LARGE, big.offset + LARGE + 8192), (big.offset - 512, big.offset),
             (big.offset + 3 * LARGE, big.offset + 3 * LARGE + 4096)]
    z = Ztoc.parse(build_ztoc(io.BytesIO(blob), "gzip", SPAN,
                              span_end=recorded_span_end(reads, SPAN, 4 * SPAN)))
    check_toc(z, raw)
    check_spans(z, blob, raw)
    assert read_range(z, lambda a, b: blob[a:b], 0, z.uncompressed_size) == raw[:z.uncompressed_size]
    block = 128 << 10          # as in _check_layout
    touched = spans_in_read_order(z, reads)
    assert [touched.index(min(z.spans_for(a, b))) for a, b in reads] == sorted(
        touched.index(min(z.spans_for(a, b))) for a, b in reads), "in the order read"
    held = sum(z.span_uncompressed_range(i)[1] - z.span_uncompressed_range(i)[0] for i in touched)
    before = sum(uniform.span_uncompressed_range(i)[1] - uniform.span_uncompressed_range(i)[0]
                 for i in spans_in_read_order(uniform, reads))
    assert held <= len(reads) * (8192 + 2 * RECORDED_MARGIN + 2 * block) and held < before
    longest = max(t - s for s, t in _spans(z))
    assert 2 * SPAN < longest <= 4 * SPAN + block
    assert z.num_spans < uniform.num_spans


def test_no_recorded_read_leaves_spans_of_the_unread_size() -> None:
    from lazyoci.ztoc.span_layout import recorded_span_end
    end = recorded_span_end([], SPAN, 4 * SPAN)
    assert end(0) == 4 * SPAN and end(12345) == 12345 + 4 * SPAN
    end = recorded_span_end([(10 * SPAN, 10 * SPAN + 10)], SPAN, 4 * SPAN)
    assert end(0) < 10 * SPAN and end(10 * SPAN) <= 10 * SPAN + (128 << 10) and end(10 * SPAN) > 10 * SPAN


@pytest.mark.parametrize("said", ["abc", "0", "-4194304", str(128 << 20), "4\u00b2", "9" * 5000])
def test_a_recorded_rebuild_refuses_an_index_span_size_that_is_no_size(layer, tmp_path, said) -> None:
    from lazyoci.oci import mediatypes as mt
    from lazyoci.oci.digest import sha256_digest
    from lazyoci.oci.manifest import Descriptor
    from lazyoci.soci.index import ANN_SPAN_SIZE
    from lazyoci.soci.recorded_spans import rebuild_for_reads
    from lazyoci.store.blobs import BlobStore
    from lazyoci.store.layout import DataRoot

    _raw, blob = layer
    desc = Descriptor(mt.OCI_LAYER_GZIP, sha256_digest(blob), len(blob))
    old = Descriptor(mt.SOCI_LAYER, "sha256:" + "5" * 64, 1, annotations={ANN_SPAN_SIZE: said})
    store = BlobStore(DataRoot(tmp_path / "root"))
    with pytest.raises(FormatError, match="span size"):
        rebuild_for_reads(io.BytesIO(blob), desc, old, [(0, 4096)], store)
    assert not list((tmp_path / "root").rglob("sha256/*")), "nothing stored"
