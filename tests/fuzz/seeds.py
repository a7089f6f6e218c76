"""Seed corpora for the fuzz targets, made from real objects: a tar of every entry kind built
by Python's tarfile, zTOCs that lazyoci builds from it (gzip and uncompressed), a SOCI index,
image manifests, indexes and configs, references, and config files.

Seeds stay small (a few KiB) so that libFuzzer mutates them quickly.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from helpers.images import Entry, image_config, make_layer, tar_bytes
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import Descriptor
from lazyoci.soci.index import make_index, ztoc_descriptor
from lazyoci.ztoc import build_ztoc


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _entries() -> list[Entry]:
    return [
        Entry("etc/", kind="dir"),
        Entry("etc/hostname", data=b"fuzz\n", mode=0o644, uid=1000, gid=1000),
        Entry("bin/", kind="dir", mode=0o700),
        Entry("bin/tool", data=b"\x7fELF" + bytes(range(256)) * 3, mode=0o4755),
        Entry("bin/link", kind="symlink", linkname="tool"),
        Entry("bin/hard", kind="hardlink", linkname="bin/tool"),
        Entry("dev/null", kind="char", devmajor=1, devminor=3, mode=0o666),
        Entry("dev/loop0", kind="block", devmajor=7, devminor=0),
        Entry("run/fifo", kind="fifo"),
        Entry("long-" + "n" * 120 + ".txt", data=b"a long name\n"),
        Entry("données/ünïcödé.txt", data=b"non-ASCII\n",
              pax={"SCHILY.xattr.user.comment": "hello", "mtime": "1700000000.5"}),
        Entry("etc/.wh..wh..opq", data=b""),
    ]


def _layer_tar() -> bytes:
    return tar_bytes(_entries())


def seeds(target: str) -> list[bytes]:
    """Seed inputs of one target (names as in targets.TARGETS)."""
    raw = _layer_tar()
    gz = make_layer(raw, "gzip")
    gnu = tar_bytes(_entries()[:4], format=tarfile.GNU_FORMAT)
    if target == "zstd_chunked_toc":       # TOCs skopeo wrote for the same entries
        return [bytes([min(-(-data_end // 4096), 255)]) + toc for data_end, toc in _zstd_chunked_tocs(raw)]
    if target == "tar_stream":
        return [raw, gnu, raw[:1024], bytes(1024)]
    if target == "toc_builder":           # the first byte picks where the stream is cut in two
        return [b"\x05" + raw, b"\x00" + gnu]
    if target == "ztoc":
        return [build_ztoc(io.BytesIO(gz.blob), "gzip", span_size=1024),
                build_ztoc(io.BytesIO(raw), "none", span_size=2048)]
    if target == "estargz":
        return [estargz_tail(), estargz_tail(legacy=True)]
    if target == "zinfo":
        from lazyoci.ztoc.reader import Ztoc
        points = Ztoc.parse(build_ztoc(io.BytesIO(gz.blob), "gzip", span_size=1024)).checkpoints
        assert points is not None
        return [len(gz.blob).to_bytes(8, "little") + bytes(points._blob)]
    layer_desc = Descriptor(gz.media_type, gz.digest, len(gz.blob))
    config = image_config([gz], cmd=["/bin/sh"], env=["A=1"], user="1000:1000")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": _sha(config), "size": len(config)},
        "layers": [{"mediaType": gz.media_type, "digest": gz.digest, "size": len(gz.blob),
                    "annotations": {"a": "b"}}],
        "annotations": {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"},
    }, sort_keys=True).encode()
    index = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_INDEX,
        "manifests": [{"mediaType": mt.OCI_MANIFEST, "digest": _sha(manifest), "size": len(manifest),
                       "platform": {"architecture": "amd64", "os": "linux"}},
                      {"mediaType": mt.OCI_MANIFEST, "digest": _sha(b"arm"), "size": 3,
                       "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}}],
    }, sort_keys=True).encode()
    if target == "soci_index":
        zdesc = ztoc_descriptor(_sha(b"ztoc"), 4, layer_desc, 1 << 22)
        subject = Descriptor(mt.OCI_MANIFEST, _sha(manifest), len(manifest))
        return [make_index("v1", [zdesc], subject, "lazyoci fuzz").raw,
                make_index("v2", [zdesc], None, "lazyoci fuzz").raw]
    if target == "manifest":
        return [b"\x00" + manifest, b"\x01" + manifest, b"\x02" + index, b"\x03" + config,
                b"\x0c" + manifest.replace(mt.OCI_MANIFEST.encode(), mt.DOCKER_MANIFEST.encode())]
    if target == "reference":
        return [b"busybox", b"docker.io/library/busybox:1.36", b"localhost:5000/a/b:c",
                b"[::1]:5000/repo@" + _sha(b"x").encode(), b"registry.example/app:1.0@" + _sha(b"y").encode()]
    if target == "config_file":
        return [b"snapshotters:\n  - soci\nruntime: runc\ninsecure_registries: [reg.lan:5000]\n"
                b"registry_mirrors:\n  docker.io: [\"http://127.0.0.1:5001\"]\n"
                b"soci:\n  background_fetch: true\n  background_quiet_seconds: 2.5\n"
                b"  background_interval_ms: 100\n  cache_max_bytes: 1000000\n  verify: true\n",
                b"snapshotters: overlayfs\n", b"{}\n"]
    raise KeyError(target)


def _zstd_chunked_tocs(raw: bytes) -> list[tuple[int, bytes]]:
    """(where the file frames end, TOC JSON) of the layer `raw` as skopeo converts it to zstd:chunked."""
    import subprocess
    import tempfile

    from helpers.zstd_chunked import blob, chunked_layout, layout_manifest
    from lazyoci.zstdchunked.annotations import toc_location
    from lazyoci.zstdchunked.toc import decode_toc

    layer = make_layer(raw, "none")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        from helpers.images import write_oci_layout
        write_oci_layout(src, [layer], image_config([layer]))
        try:
            layout = chunked_layout(src, Path(tmp) / "out")
        except (OSError, subprocess.CalledProcessError):     # no skopeo: a hand-made TOC of that shape
            return [(1 << 12, json.dumps({"version": 1, "entries": [
                {"type": "dir", "name": "etc/", "mode": 493},
                {"type": "reg", "name": "etc/hostname", "size": 5, "offset": 100, "endOffset": 120,
                 "digest": _sha(b"fuzz\n")}]}).encode())]
        desc = layout_manifest(layout)["layers"][0]
        data = blob(layout, desc["digest"])
        loc = toc_location(desc["annotations"], len(data))
        assert loc is not None
        out.append((loc.data_end, decode_toc(data[loc.offset:loc.offset + loc.length])))
    return out


def estargz_tail(legacy: bool = False, name: str = "etc/b") -> bytes:
    """The tail of a small eStargz layer (TOC member and footer) as ctr-remote lays it out: every
    entry kind, a file in two chunks, a landmark. The seed's TOC offset is made up (4096)."""
    import gzip

    toc_offset = 4096
    d = "sha256:" + "ab" * 32
    toc = {"version": 1, "entries": [
        {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 90, "chunkDigest": d},
        {"name": "etc/", "type": "dir", "mode": 493, "modtime": "2023-11-14T22:13:20Z"},
        {"name": "etc/a", "type": "reg", "size": 10, "offset": 200, "chunkSize": 6, "chunkDigest": d,
         "uid": 1000, "gid": 50, "mode": 2541, "xattrs": {"user.x": "eQ=="}},
        {"name": "etc/a", "type": "chunk", "offset": 300, "chunkOffset": 6, "chunkDigest": d},
        {"name": name, "type": "reg", "size": 3, "offset": 300, "innerOffset": 700, "chunkDigest": d},
        {"name": "etc/l", "type": "symlink", "linkName": "a"},
        {"name": "etc/h", "type": "hardlink", "linkName": "etc/a"},
        {"name": "etc/.wh.gone", "type": "reg"},
        {"name": "dev/c", "type": "char", "devMajor": 1, "devMinor": 3},
        {"name": "dev/f", "type": "fifo"}]}
    body = json.dumps(toc).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("stargz.index.json")
        ti.size = len(body)
        tf.addfile(ti, io.BytesIO(body))
    text = b"%016xSTARGZ" % toc_offset
    extra = text if legacy else b"SG" + len(text).to_bytes(2, "little") + text
    footer = (b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + len(extra).to_bytes(2, "little") + extra
              + b"\x01\x00\x00\xff\xff" + bytes(8))
    return gzip.compress(buf.getvalue(), mtime=0) + footer


def write_corpus(target: str, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(seeds(target)):
        (directory / f"seed-{i}").write_bytes(data)
    return directory
