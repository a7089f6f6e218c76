"""The caps of lazyoci.ztoc.limits: a zTOC or SOCI index over one is refused with an error that
names the limit, before anything is served from it; an index at the caps is accepted."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.hostile_ztoc import claiming_entries, renamed, ztoc_parts
from helpers.images import Entry, tar_bytes
from lazyoci.errors import ConfigError, FormatError
from lazyoci.oci import mediatypes as mt
from lazyoci.soci import SociBuildOptions
from lazyoci.soci.index import SociIndex, go_json
from lazyoci.ztoc import Ztoc, build_ztoc
from lazyoci.ztoc import limits
from lazyoci.ztoc.codec import UNCOMPRESSED, encode_ztoc, encode_tar_zinfo
from lazyoci.ztoc.toc import TocBuilder

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
SPAN = 1 << 16


@pytest.fixture(scope="module")
def small():
    """A gzip layer of a few files, and its zTOC parts at a 64 KiB span size."""
    raw = tar_bytes([Entry("dir", kind="dir"), Entry("dir/hello.txt", data=b"hello\n"),
                     Entry("dir/link", kind="symlink", linkname="hello.txt"),
                     Entry("dir/data.bin", data=os.urandom(300_000))])
    return ztoc_parts(gzip.compress(raw, 6, mtime=0), SPAN)


@pytest.fixture(scope="module")
def zeros():
    """A gzip layer holding one 96 MiB file of zeros: 96 MiB inflated, ~100 KB compressed."""
    raw = tar_bytes([Entry("zeros.bin", data=bytes(96 << 20))])
    return gzip.compress(raw, 1, mtime=0)


def _refused(data: bytes, limit: limits.Limit) -> str:
    with pytest.raises(FormatError) as exc:
        Ztoc.parse(data)
    assert limit.name in str(exc.value), exc.value
    return str(exc.value)


def test_declared_span_size_over_the_cap(small):
    msg = _refused(small.encode(span_size=1 << 30), limits.MAX_SPAN_SIZE)
    assert "1,073,741,824" in msg
    raw = tar_bytes([Entry("a", data=b"x" * 5000)])
    toc = TocBuilder()
    toc.feed(raw)
    tar_ztoc = encode_ztoc(build_tool="t", compressed_size=len(raw), uncompressed_size=len(raw),
                           entries=toc.finish(), algorithm=UNCOMPRESSED,
                           span_digests=["sha256:" + "0" * 64], checkpoints=encode_tar_zinfo(1 << 30, len(raw)))
    _refused(tar_ztoc, limits.MAX_SPAN_SIZE)


def test_a_span_over_the_cap_whatever_the_declared_size_and_one_at_the_cap(zeros):
    parts = ztoc_parts(zeros, 4 << 20)
    assert Ztoc.parse(parts.encode()).num_spans > 20
    msg = _refused(parts.one_span(), limits.MAX_SPAN_BYTES)   # declared 4 MiB, one span of 96 MiB
    assert "span 0" in msg
    # lazyoci's own index at the largest span size is accepted: its spans end past the size
    z = Ztoc.parse(build_ztoc(io.BytesIO(zeros), "gzip", limits.MAX_SPAN_SIZE.value))
    assert z.span_size == limits.MAX_SPAN_SIZE.value and z.num_spans == 2
    biggest = max(z.span_uncompressed_range(i)[1] - z.span_uncompressed_range(i)[0] for i in range(2))
    assert limits.MAX_SPAN_SIZE.value <= biggest <= limits.MAX_SPAN_BYTES.value


def test_span_count_over_the_cap():
    raw = tar_bytes([Entry("a", data=os.urandom(200_000))])
    toc = TocBuilder()
    toc.feed(raw)
    tiny_spans = encode_ztoc(build_tool="t", compressed_size=len(raw), uncompressed_size=len(raw),
                             entries=toc.finish(), algorithm=UNCOMPRESSED, span_digests=["sha256:" + "0" * 64],
                             checkpoints=encode_tar_zinfo(1, len(raw)))      # 201,216 spans of one byte
    _refused(tiny_spans, limits.MAX_SPANS)


def test_entry_count_over_the_cap(small):
    _refused(claiming_entries(small.encode(), limits.MAX_ENTRIES.value + 1), limits.MAX_ENTRIES)


def test_name_component_over_255_bytes(small):
    Ztoc.parse(renamed(small, b"dir/hello.txt", b"dir/" + b"h" * 255))     # 255 is fine
    _refused(renamed(small, b"dir/hello.txt", b"dir/" + b"h" * 256), limits.MAX_COMPONENT_BYTES)


def test_name_with_a_nul_byte(small):
    with pytest.raises(FormatError, match="NUL"):
        Ztoc.parse(renamed(small, b"dir/hello.txt", b"dir/hel\0lo.txt"))


def test_path_over_path_max(small):
    deep = b"/".join([b"d" * 200] * 21)      # 4220 bytes, every component short
    _refused(renamed(small, b"dir/hello.txt", deep), limits.MAX_NAME_BYTES)


def test_link_targets(small):
    entries = [e._replace(linkname=b"x" * 4096) if e.name == b"dir/link" else e for e in small.entries]
    _refused(small.encode(entries), limits.MAX_LINK_BYTES)
    entries = [e._replace(linkname=b"hel\0lo") if e.name == b"dir/link" else e for e in small.entries]
    with pytest.raises(FormatError, match="NUL"):
        Ztoc.parse(small.encode(entries))
    long_ok = [e._replace(linkname=b"x" * 300) if e.name == b"dir/link" else e for e in small.entries]
    Ztoc.parse(small.encode(long_ok))        # a symlink target may have long components


def test_xattrs_over_the_kernel_limits(small):
    def with_pax(key: bytes, value: bytes) -> bytes:
        return small.encode([e._replace(pax=((key, value),)) if e.name == b"dir/hello.txt" else e
                             for e in small.entries])
    Ztoc.parse(with_pax(b"SCHILY.xattr.user.big", b"v" * 65536))
    _refused(with_pax(b"SCHILY.xattr.user.big", b"v" * 65537), limits.MAX_XATTR_VALUE_BYTES)
    _refused(with_pax(b"SCHILY.xattr.user." + b"n" * 251, b"v"), limits.MAX_XATTR_NAME_BYTES)


def test_ztoc_over_the_size_cap():
    _refused(bytes(limits.MAX_ZTOC_BYTES.value + 1), limits.MAX_ZTOC_BYTES)


def _index(size: int, span: str = "4194304") -> bytes:
    layer = "sha256:" + "1" * 64
    return go_json({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.SOCI_INDEX_V1, "digest": "sha256:" + "2" * 64, "size": 2},
        "layers": [{"mediaType": mt.SOCI_LAYER, "digest": "sha256:" + "3" * 64, "size": size,
                    "annotations": {"com.amazon.soci.image-layer-digest": layer,
                                    "com.amazon.soci.image-layer-mediaType": mt.OCI_LAYER_GZIP,
                                    "com.amazon.soci.span-size": span}}],
        "subject": {"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + "4" * 64, "size": 100},
    })


def test_index_refuses_a_ztoc_descriptor_over_the_size_cap():
    SociIndex.parse(_index(limits.MAX_ZTOC_BYTES.value))
    with pytest.raises(FormatError, match="MAX_ZTOC_BYTES"):
        SociIndex.parse(_index(limits.MAX_ZTOC_BYTES.value + 1))
    with pytest.raises(FormatError, match="MAX_SPAN_SIZE"):
        SociIndex.parse(_index(1000, span=str(1 << 30)))


def test_building_over_the_span_size_cap_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="MAX_SPAN_SIZE"):
        SociBuildOptions(span_size=limits.MAX_SPAN_SIZE.value + 1)
    SociBuildOptions(span_size=limits.MAX_SPAN_SIZE.value)
    with pytest.raises(FormatError, match="MAX_SPAN_SIZE"):
        build_ztoc(io.BytesIO(gzip.compress(tar_bytes([Entry("a", data=b"a")]))), "gzip", 1 << 30)
    r = subprocess.run([LAZYOCI, "--root", str(tmp_path / "root"), "soci", "create", "--span-size",
                        "1073741824", "localhost:5000/any:latest"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "MAX_SPAN_SIZE" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
