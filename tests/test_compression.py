"""Layer and tarball compression is chosen in one place (lazyoci.oci.compression)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from pathlib import Path

import pytest
import zstandard

import lazyoci
from lazyoci.errors import FormatError
from lazyoci.oci.compression import SNIFF_BYTES, open_decompressed, sniff_compression

SRC = Path(lazyoci.__file__).parent
RAW = bytes(range(256)) * 4096

_BY_NAME = {
    "none": lambda b: b,
    "gzip": lambda b: gzip.compress(b[:1000]) + gzip.compress(b[1000:]),        # two members, as pigz
    "zstd": lambda b: (zstandard.ZstdCompressor().compress(b[:1000])
                       + zstandard.ZstdCompressor().compress(b[1000:])),        # two frames
    "xz": lzma.compress,
    "bzip2": bz2.compress,
}


@pytest.mark.parametrize("name", list(_BY_NAME))
def test_each_compression_is_sniffed_and_undone(name):
    blob = _BY_NAME[name](RAW)
    assert sniff_compression(blob[:SNIFF_BYTES]) == name
    assert open_decompressed(io.BytesIO(blob), name).read() == RAW


def test_an_unknown_compression_is_a_format_error():
    with pytest.raises(FormatError, match="unsupported layer compression 'lz4'"):
        open_decompressed(io.BytesIO(b""), "lz4")


def test_no_other_module_chooses_a_decompressor():
    markers = ("igzip", "ZstdDecompressor", "LZMAFile", "BZ2File", "GzipFile", "decompressobj",
               r"\x1f\x8b", r"\x28\xb5")
    choosers = sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
                      if any(m in p.read_text() for m in markers))
    assert choosers == ["oci/compression.py"]

