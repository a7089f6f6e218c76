"""zstd:chunked images made by skopeo and podman, run lazily through `--snapshotter soci` without any SOCI index:
the lazy tree equals umoci's unpack of the same image, a small read of a large layer fetches little,
an altered byte inside a chunk is EIO, and a TOC that cannot be trusted makes its layer a full download."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, write_oci_layout
from helpers.lazy import overlay, write_config
from helpers.tree import diff_trees, layer_tree, walk_tree
from helpers.tricky_image import PASSWD
from helpers.zstd_chunked import (blob, chunked_layout, go_layer, layout_manifest, nonce, podman_push_chunked,
                                  push_chunked, tricky_go_image)
from lazyoci.config import load_config
from lazyoci.images.service import ImageService
from lazyoci.service.client import ServiceClient
from lazyoci.snapshot.soci import SociSnapshotter
from lazyoci.store.layout import DataRoot
from lazyoci.zstdchunked import ZstdChunkedToc, toc_location
from lazyoci.zstdchunked.annotations import PREFIXES

pytestmark = pytest.mark.needs_root("FUSE, overlay and runc")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def _lz(root: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def soci_config(tmp_path) -> Path:
    return write_config(tmp_path / "config.yaml", extra="snapshotters:\n  - soci\n")


class Pulled:
    def __init__(self, data_root: Path, config: Path) -> None:
        self.root = DataRoot(data_root)
        self.images = ImageService(self.root)
        self.snap = SociSnapshotter(self.root, load_config(config), client=self.images.client)
        self.config = config
        self.lines: list[str] = []

    def pull(self, ref: str):
        return self.snap.pull(self.images, ref, log=self.lines.append)

    def close(self) -> None:
        self.images.close()
        ServiceClient(self.root, self.config).stop()


@pytest.fixture
def pulled(data_root, soci_config):
    p = Pulled(data_root, soci_config)
    yield p
    p.close()


def _manifest(host: str, repo: str) -> dict:
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/latest",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("producer", ["skopeo", "podman"])
def test_an_image_is_lazy_and_equals_umoci_unpack(registry, pulled, tmp_path, producer):
    img = tricky_go_image(tmp_path)
    ref = f"{registry.host}/zc/tricky-{producer}:latest"
    if producer == "skopeo":
        push_chunked(img.layout, ref)
    else:
        podman_push_chunked(img.layout, ref, tmp_path)
    image = pulled.pull(ref)
    assert image.snapshotter == "soci"
    assert not any(l.startswith("INFO") for l in pulled.lines), pulled.lines
    layers = image.manifest.layers
    assert all(l.media_type.endswith("tar+zstd") for l in layers)
    assert not any(pulled.images.blobs.has(l.digest) for l in layers)       # nothing downloaded whole
    dirs = []
    for layer in layers:
        rec = pulled.snap.lazy_layer(layer.digest)
        assert rec is not None and rec.ztoc_digest == toc_location(layer.annotations, layer.size).checksum
        dirs.append(pulled.snap.service.view_dir(layer.digest, rec.ztoc_digest))

    bundle = tmp_path / "umoci-bundle"       # umoci unpacks the gzip original: the same tar streams
    subprocess.run(["umoci", "unpack", "--image", f"{img.layout}:latest", str(bundle)],
                   check=True, capture_output=True)
    with overlay(list(reversed(dirs)), tmp_path / "merged") as merged:
        problems = diff_trees(walk_tree(bundle / "rootfs", mtimes=True), walk_tree(merged, mtimes=True))
    assert not problems, "\n".join(problems)

    r = _lz(pulled.root.path, pulled.config, "run", "--rm", ref, "cat", "/etc/passwd")
    assert r.returncode == 0 and r.stdout.encode() == PASSWD, r.stderr


def test_each_layer_equals_lazyocis_own_full_unpack(registry, pulled, tmp_path):
    """Layer by layer against the overlayfs unpacker fed the zstd:chunked blob itself."""
    from lazyoci.snapshot.unpack import apply_layer_stream

    img = tricky_go_image(tmp_path)
    out = chunked_layout(img.layout, tmp_path / "chunked")
    push_chunked(img.layout, f"{registry.host}/zc/layers:latest")
    image = pulled.pull(f"{registry.host}/zc/layers:latest")
    local = {d["digest"]: blob(out, d["digest"]) for d in layout_manifest(out)["layers"]}
    for i, layer in enumerate(image.manifest.layers):
        rec = pulled.snap.lazy_layer(layer.digest)
        unpacked = tmp_path / f"unpacked{i}"
        unpacked.mkdir()
        apply_layer_stream([local[layer.digest]], layer.media_type, unpacked)
        lazy_dir = pulled.snap.service.view_dir(layer.digest, rec.ztoc_digest)
        problems = diff_trees(layer_tree(unpacked), layer_tree(lazy_dir))
        assert not problems, f"layer {i + 1}:\n" + "\n".join(problems)


def _two_files_image(tmp_path: Path, registry_host: str, repo: str) -> tuple[bytes, bytes]:
    one, two = os.urandom(300_000), os.urandom(300_000)
    layer = go_layer([Entry("d/", "dir"), Entry("d/one", data=one), Entry("d/two", data=two)])
    src = tmp_path / f"src-{repo.replace('/', '_')}"
    write_oci_layout(src, [layer], image_config([layer]))
    push_chunked(src, f"{registry_host}/{repo}:latest")
    return one, two


def test_one_altered_byte_inside_a_chunk_is_eio(fresh_registry, pulled, tmp_path):
    one, two = _two_files_image(tmp_path, fresh_registry.host, "zc/altered")
    desc = _manifest(fresh_registry.host, "zc/altered")["layers"][0]
    stored = fresh_registry.blob_path(desc["digest"])
    data = stored.read_bytes()
    loc = toc_location(desc["annotations"], len(data))
    index = ZstdChunkedToc.parse(data[loc.offset:loc.offset + loc.length])
    first = next(i for i in range(len(index)) if index.entry(i).name == "d/one")
    c0, c1 = index.span_compressed_range(index.spans_for(index.entry(first).offset, index.entry(first).offset + 1)[0])
    altered = bytearray(data)
    altered[(c0 + c1) // 2] ^= 0x01                      # inside the first chunk of d/one
    stored.write_bytes(bytes(altered))

    image = pulled.pull(f"{fresh_registry.host}/zc/altered:latest")
    layer = image.manifest.layers[0]
    lazy_dir = pulled.snap.service.view_dir(layer.digest, pulled.snap.lazy_layer(layer.digest).ztoc_digest)
    with pytest.raises(OSError) as exc:
        (lazy_dir / "d/one").read_bytes()
    assert exc.value.errno == errno.EIO
    assert (lazy_dir / "d/two").read_bytes() == two        # the other file's chunks are intact
    log = (pulled.root.service / "lazyoci.log").read_text()
    assert "digest mismatch" in log or "does not decode" in log


def _retagged(layout: Path, edit, layer: int = 0) -> Path:
    """The layout with the annotations of its manifest's `layer` changed by `edit` (a new manifest)."""
    index = json.loads((layout / "index.json").read_text())
    manifest = layout_manifest(layout)
    edit(manifest["layers"][layer]["annotations"], manifest["layers"][layer]["size"])
    raw = json.dumps(manifest).encode()
    import hashlib
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(raw)
    index["manifests"][0].update(digest=digest, size=len(raw))
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def _key(annotations: dict, name: str) -> str:
    return next(k for k in annotations if k.startswith(PREFIXES) and k.endswith(name))


@pytest.mark.parametrize("case, why", [
    ("checksum", "digest mismatch"),
    ("past_end", "outside"),
    ("overlapping", "overlaps"),
])
def test_a_toc_that_cannot_be_trusted_makes_a_full_download(registry, pulled, tmp_path, case, why):
    one, two = os.urandom(100_000), os.urandom(100_000)
    layer = go_layer([Entry("busy/", "dir"), Entry("busy/one", data=one), Entry("busy/two", data=two), nonce()])
    src = tmp_path / "src"
    write_oci_layout(src, [layer], image_config([layer]))
    out = chunked_layout(src, tmp_path / "chunked")

    def edit(annotations: dict, size: int) -> None:
        if case == "checksum":
            annotations[_key(annotations, "checksum")] = "sha256:" + "0" * 64
        elif case == "past_end":
            off, length, usize, kind = annotations[_key(annotations, "position")].split(":")
            annotations[_key(annotations, "position")] = f"{size - 10}:{length}:{usize}:{kind}"
        else:   # a TOC (stored right, annotated right) whose second file's frames overlap the first's
            raise AssertionError

    if case == "overlapping":
        _overlapping_toc(out)
    else:
        _retagged(out, edit)
    repo = f"zc/bad-{case}"
    subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                    f"oci:{out}:latest", f"docker://{registry.host}/{repo}:latest"], check=True, capture_output=True)
    image = pulled.pull(f"{registry.host}/{repo}:latest")
    info = [l for l in pulled.lines if l.startswith("INFO")]
    # one line, as the SOCI index path says it: why, and that nothing is lazy
    assert len(info) == 1 and "zstd:chunked TOC" in info[0] and why in info[0], pulled.lines
    assert "no lazy loading" in info[0], pulled.lines
    assert image.snapshotter == "overlayfs"                       # nothing lazy: never reported so
    assert pulled.images.blobs.has(image.manifest.layers[0].digest)
    top = pulled.snap.unpack_image(pulled.images, image)
    assert not pulled.snap.is_lazy(top)


def test_a_refused_toc_beside_a_lazy_layer_is_one_line_for_that_layer(registry, pulled, tmp_path):
    """The first layer's TOC does not match its annotation, the second's does: one INFO line
    names the refused layer and says it alone is downloaded; the image is lazy through the other."""
    bad = go_layer([Entry("bad/", "dir"), Entry("bad/one", data=os.urandom(100_000)), nonce("bad")])
    good = go_layer([Entry("good/", "dir"), Entry("good/one", data=os.urandom(100_000)), nonce("good")])
    src = tmp_path / "src"
    write_oci_layout(src, [bad, good], image_config([bad, good]))
    out = chunked_layout(src, tmp_path / "chunked")

    def edit(annotations: dict, size: int) -> None:
        annotations[_key(annotations, "checksum")] = "sha256:" + "0" * 64

    _retagged(out, edit)
    subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                    f"oci:{out}:latest", f"docker://{registry.host}/zc/half:latest"], check=True, capture_output=True)
    image = pulled.pull(f"{registry.host}/zc/half:latest")
    refused, lazy = image.manifest.layers
    info = [l for l in pulled.lines if l.startswith("INFO")]
    assert len(info) == 1 and refused.digest in info[0] and "digest mismatch" in info[0], pulled.lines
    assert "downloading that layer" in info[0] and "no lazy loading" not in info[0], pulled.lines
    assert image.snapshotter == "soci"
    assert pulled.images.blobs.has(refused.digest) and not pulled.images.blobs.has(lazy.digest)


def test_a_refused_toc_above_a_lazy_layer_is_downloaded_and_runs(registry, data_root, soci_config, tmp_path):
    """The top layer's TOC is refused, the base's is used: `pull` downloads the top layer alone
    and unpacks it above the lazy base, and `run` sees both."""
    from helpers.tricky_image import APPLETS, BUSYBOX

    base = go_layer([Entry("bin/", "dir"), Entry("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755),
                     *[Entry(f"bin/{a}", "symlink", linkname="busybox") for a in APPLETS], nonce()])
    top_bytes = os.urandom(100_000)
    top = go_layer([Entry("data/", "dir"), Entry("data/one", data=top_bytes), nonce("top")])
    src = tmp_path / "src"
    write_oci_layout(src, [base, top], image_config([base, top], cmd=["/bin/sh"]))
    out = chunked_layout(src, tmp_path / "chunked")

    def edit(annotations: dict, size: int) -> None:
        annotations[_key(annotations, "checksum")] = "sha256:" + "0" * 64

    _retagged(out, edit, layer=1)
    ref = f"{registry.host}/zc/top-refused:latest"
    subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                    f"oci:{out}:latest", f"docker://{ref}"], check=True, capture_output=True)
    try:
        r = _lz(data_root, soci_config, "pull", "--snapshotter", "soci", ref)
        assert r.returncode == 0 and "downloading that layer" in r.stderr, r.stderr
        r = subprocess.run([LAZYOCI, "--root", str(data_root), "--config", str(soci_config), "run", "--rm",
                            "--snapshotter", "soci", ref, "cat", "/data/one"], capture_output=True, timeout=300)
        assert r.returncode == 0 and r.stdout == top_bytes, r.stderr
    finally:
        ServiceClient(DataRoot(data_root), soci_config).stop()


def _overlapping_toc(layout: Path) -> None:
    """Rewrite the layout's only layer: its TOC says the second file's frames start inside the first's
    (TOC re-compressed into the blob, annotations and manifest updated, so every digest is right)."""
    import hashlib

    import zstandard

    manifest = layout_manifest(layout)
    desc = manifest["layers"][0]
    data = blob(layout, desc["digest"])
    loc = toc_location(desc["annotations"], len(data))
    from lazyoci.zstdchunked.toc import decode_toc
    doc = json.loads(decode_toc(data[loc.offset:loc.offset + loc.length]))
    files = [e for e in doc["entries"] if e["type"] == "reg"]
    files[1]["offset"] = files[0]["offset"] + 1
    new_toc = zstandard.ZstdCompressor().compress(json.dumps(doc).encode())
    head = data[:loc.offset - 8]
    new_blob = head + b"\x50\x2a\x4d\x18" + len(new_toc).to_bytes(4, "little") + new_toc
    layer_digest = "sha256:" + hashlib.sha256(new_blob).hexdigest()
    (layout / "blobs" / "sha256" / layer_digest[7:]).write_bytes(new_blob)
    ann = desc["annotations"]
    ann[_key(ann, "checksum")] = "sha256:" + hashlib.sha256(new_toc).hexdigest()
    ann[_key(ann, "position")] = f"{loc.offset}:{len(new_toc)}:{len(json.dumps(doc))}:1"
    desc.update(digest=layer_digest, size=len(new_blob))
    raw = json.dumps(manifest).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(raw)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0].update(digest=digest, size=len(raw))
    (layout / "index.json").write_text(json.dumps(index))


@pytest.mark.slow
def test_a_small_read_of_a_200_mib_layer_fetches_little(registry, data_root, soci_config, tmp_path):
    """`run --snapshotter soci` of a skopeo image with a 200 MiB layer: a read of 100 bytes of it
    serves under 10% of the image from the registry (counted by a proxy in front of it)."""
    from helpers.fault_proxy import FaultProxy
    from helpers.tricky_image import APPLETS, BUSYBOX

    base = go_layer([Entry("bin/", "dir"), Entry("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755),
                     *[Entry(f"bin/{a}", "symlink", linkname="busybox") for a in APPLETS], nonce()])
    big = os.urandom(200 << 20)
    data = go_layer([Entry("data/", "dir"), Entry("data/big", data=big), nonce()])
    src = tmp_path / "src"
    write_oci_layout(src, [base, data], image_config([base, data], cmd=["/bin/sh"]))
    push_chunked(src, f"{registry.host}/zc/big:latest")
    image_bytes = sum(l["size"] for l in _manifest(registry.host, "zc/big")["layers"])
    assert image_bytes > 200 << 20
    try:
        with FaultProxy(registry.host) as proxy:
            ref = f"{proxy.host}/zc/big:latest"
            r = _lz(data_root, soci_config, "pull", "--snapshotter", "soci", ref)
            assert r.returncode == 0 and "INFO" not in r.stderr, r.stderr
            out = subprocess.run([LAZYOCI, "--root", str(data_root), "--config", str(soci_config), "run", "--rm",
                                  "--snapshotter", "soci", ref, "head", "-c", "100", "/data/big"],
                                 capture_output=True, timeout=300)
            assert out.returncode == 0 and out.stdout == big[:100], out.stderr
            served = proxy.bytes_served
        assert served < image_bytes // 10, f"{served:,} of {image_bytes:,} bytes came from the registry"
        r = _lz(data_root, soci_config, "images")
        assert "soci (zstd:chunked)" in r.stdout, r.stdout       # the lazy layers' format, as for eStargz
        r = _lz(data_root, soci_config, "service", "status")
        assert "zstd:chunked" in r.stdout, r.stdout
    finally:
        ServiceClient(DataRoot(data_root), soci_config).stop()


def test_a_restarted_service_serves_the_layer_again(registry, pulled, tmp_path):
    """The service mounts recorded views again after a restart: it tells a stored zstd:chunked
    TOC from a zTOC by its bytes and parses it the same way."""
    one, two = _two_files_image(tmp_path, registry.host, "zc/restart")
    image = pulled.pull(f"{registry.host}/zc/restart:latest")
    layer = image.manifest.layers[0]
    lazy_dir = pulled.snap.service.view_dir(layer.digest, pulled.snap.lazy_layer(layer.digest).ztoc_digest)
    assert (lazy_dir / "d/one").read_bytes() == one
    client = ServiceClient(pulled.root, pulled.config)
    client.stop()
    client.start()
    assert (lazy_dir / "d/two").read_bytes() == two          # never read before: fetched after the restart
    assert (lazy_dir / "d/one").read_bytes() == one


@pytest.mark.parametrize("remove", [("rmi",), ("system", "prune", "-a", "-f")])
def test_a_layers_toc_goes_with_the_last_image_that_needs_it(registry, data_root, soci_config, tmp_path, remove):
    """A zstd:chunked TOC is stored owned by its layer: it stays while an image still needs the
    layer lazily, and `rmi` / `system prune` of the last one deletes it."""
    from lazyoci.store.blobs import BlobStore
    from lazyoci.store.db import Database
    from lazyoci.store.image_records import ImageRecords

    layer = go_layer([Entry("d/", "dir"), nonce()])
    src = tmp_path / "src"
    write_oci_layout(src, [layer], image_config([layer]))
    first, second = f"{registry.host}/zc/release:latest", f"{registry.host}/zc/release:second"
    push_chunked(src, first)
    manifest = _manifest(registry.host, "zc/release")
    put = urllib.request.Request(f"http://{registry.host}/v2/zc/release/manifests/second", method="PUT",
                                 data=json.dumps(manifest).encode(),
                                 headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    urllib.request.urlopen(put, timeout=30).close()        # the same image under a second name
    desc = manifest["layers"][0]
    toc = toc_location(desc["annotations"], desc["size"]).checksum
    blob_file = data_root / "blobs" / "sha256" / toc.split(":", 1)[1]
    try:
        for ref in (first, second):
            r = _lz(data_root, soci_config, "pull", "--snapshotter", "soci", ref)
            assert r.returncode == 0 and "INFO" not in r.stderr, r.stderr
        assert blob_file.is_file()
        r = _lz(data_root, soci_config, "rmi", first)
        assert r.returncode == 0, r.stderr
        assert blob_file.is_file()                      # the second name still needs the layer
        r = _lz(data_root, soci_config, *remove, *([second] if remove == ("rmi",) else []))
        assert r.returncode == 0, r.stderr
        assert not blob_file.exists()
        records = ImageRecords(Database(DataRoot(data_root).db_path), BlobStore(DataRoot(data_root)))
        assert records.owners_of_kind("zstd-chunked") == []
    finally:
        ServiceClient(DataRoot(data_root), soci_config).stop()


def test_a_data_root_of_the_previous_version_is_served_after_a_restart(registry, pulled, tmp_path):
    """The previous version kept each view's reference in the service's own table
    (`service_views`) and formats in `lazy_index_formats`, beside a `lazy_layers` without a
    format: a service started over such a database migrates it and serves the view again."""
    from lazyoci.store.db import Database

    one, two = _two_files_image(tmp_path, registry.host, "zc/old-root")
    image = pulled.pull(f"{registry.host}/zc/old-root:latest")
    layer = image.manifest.layers[0]
    rec = pulled.snap.lazy_layer(layer.digest)
    lazy_dir = pulled.snap.service.view_dir(layer.digest, rec.ztoc_digest)
    assert (lazy_dir / "d/one").read_bytes() == one
    client = ServiceClient(pulled.root, pulled.config)
    client.stop()
    with Database(pulled.root.db_path).transaction() as c:     # back to the previous version's shape
        c.execute("CREATE TABLE service_views (layer_digest TEXT NOT NULL, ztoc_digest TEXT NOT NULL, "
                  "ref TEXT NOT NULL, mounted_at REAL NOT NULL, PRIMARY KEY (layer_digest, ztoc_digest))")
        c.execute("INSERT INTO service_views SELECT layer_digest, index_digest, ?, mounted_at "
                  "FROM service_mounted_views", (rec.ref,))
        c.execute("DROP TABLE service_mounted_views")
        c.execute("CREATE TABLE lazy_index_formats (layer_digest TEXT NOT NULL, index_digest TEXT NOT NULL, "
                  "format TEXT NOT NULL, PRIMARY KEY (layer_digest, index_digest))")
        c.execute("INSERT INTO lazy_index_formats SELECT layer_digest, ztoc_digest, format FROM lazy_layers "
                  "WHERE format != 'ztoc'")
        c.execute("CREATE TABLE old_lazy_layers (layer_digest TEXT NOT NULL, ztoc_digest TEXT NOT NULL, "
                  "ref TEXT NOT NULL, index_digest TEXT NOT NULL, created REAL NOT NULL, "
                  "PRIMARY KEY (layer_digest, ztoc_digest))")
        c.execute("INSERT INTO old_lazy_layers SELECT layer_digest, ztoc_digest, ref, index_digest, created "
                  "FROM lazy_layers")
        c.execute("DROP TABLE lazy_layers")
        c.execute("ALTER TABLE old_lazy_layers RENAME TO lazy_layers")
        c.execute("DELETE FROM schema_versions WHERE name IN ('service', 'lazy_records')")   # older DDL
    client.start()
    assert (lazy_dir / "d/two").read_bytes() == two          # never read before: fetched after the restart
    db = Database(pulled.root.db_path)
    with db.reading() as c:
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        fmt = c.execute("SELECT format FROM lazy_layers WHERE layer_digest=?", (layer.digest,)).fetchone()[0]
    assert not {"service_views", "lazy_index_formats"} & tables
    assert fmt == "zstd:chunked"
