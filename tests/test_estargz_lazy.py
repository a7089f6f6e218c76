"""eStargz images made by `ctr-remote images convert --estargz` run lazily through the soci
snapshotter with no SOCI index: the lazy tree is what `umoci unpack` makes of the same image,
a corrupted chunk is EIO, and a small read of a large layer fetches a small part of it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.estargz import convert, converter, fetch_manifest, push_estargz
from helpers.images import Entry, make_layer
from helpers.lazy import overlay, push_soci_index, write_config
from helpers.tree import diff_trees, walk_tree
from helpers.tricky_image import push_tricky_image
from lazyoci.config import load_config
from lazyoci.images.service import ImageService
from lazyoci.service.client import ServiceClient
from lazyoci.snapshot.soci import SociSnapshotter
from lazyoci.store.layout import DataRoot

pytestmark = pytest.mark.needs_root("containerd, FUSE and overlay mounts")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
SECRET = os.urandom(200_000)


@pytest.fixture(scope="module")
def converted(registry, tmp_path_factory):
    """The tricky image and a one-file image of its own, both converted to eStargz by ctr-remote."""
    work = tmp_path_factory.mktemp("esgz-lazy")
    push_tricky_image(registry.host, "esgz/tricky-src", work)
    layer = make_layer([Entry("secret", data=SECRET)])
    with converter() as cd:
        convert(cd, registry.host, "esgz/tricky-src", "esgz/tricky", chunk_size=65536)
        convert(cd, registry.host, "esgz/tricky-src", "esgz/mixed", chunk_size=65536)
        push_estargz(cd, registry.host, "esgz/corrupt", [layer], work, chunk_size=65536)
        push_estargz(cd, registry.host, "esgz/lie", [make_layer([Entry("lie.txt", data=b"a lie\n")])], work)
    return work


@pytest.fixture
def soci_config(tmp_path) -> Path:
    return write_config(tmp_path / "config.yaml", extra="snapshotters:\n  - soci\n")


def _pull(data_root: Path, config: Path, ref: str):
    root = DataRoot(data_root)
    images = ImageService(root)
    snap = SociSnapshotter(root, load_config(config), client=images.client)
    lines: list[str] = []
    image = snap.pull(images, ref, log=lines.append)
    return images, snap, image, lines


@pytest.mark.parametrize("repo", ["esgz/tricky", "esgz/mixed"])
def test_lazy_estargz_tree_equals_umoci_unpack(registry, converted, data_root, tmp_path, soci_config, repo):
    """esgz/tricky has no SOCI index: every layer is served through its own TOC. esgz/mixed gets
    one from `soci create` for its large layer only (eStargz is gzip: zTOCs are built for it, as
    the reference builds them), so one image is served through both kinds of index."""
    ref = f"{registry.host}/{repo}:latest"
    mixed = repo == "esgz/mixed"
    if mixed:
        push_soci_index(registry.host, repo, tmp_path, min_layer_size=256 << 10)
    layout = tmp_path / "layout"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                    f"oci:{layout}:latest"], check=True, capture_output=True)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)], check=True,
                   capture_output=True)
    images, snap, image, lines = _pull(data_root, soci_config, ref)
    try:
        assert image.snapshotter == "soci"
        assert not any(l.startswith("INFO") for l in lines), lines
        assert not any(images.blobs.has(l.digest) for l in image.manifest.layers)   # nothing downloaded
        dirs = [snap.service.view_dir(l.digest, snap.lazy_layer(l.digest).ztoc_digest) for l in image.manifest.layers]
        status = ServiceClient(DataRoot(data_root), soci_config).status()
        formats = [l["format"] for l in sorted(status["layers"], key=lambda l: dirs.index(
            snap.service.view_dir(l["layer_digest"], l["ztoc_digest"])))]
        assert formats == (["soci", "estargz", "estargz"] if mixed else ["estargz"] * 3)
        with overlay(list(reversed(dirs)), tmp_path / "merged") as merged:
            lazy = walk_tree(merged, mtimes=True)
        problems = diff_trees(walk_tree(bundle / "rootfs", mtimes=True), lazy)
        assert not problems, "\n".join(problems)
    finally:
        images.close()
        ServiceClient(DataRoot(data_root), soci_config).stop()


def test_a_corrupted_chunk_is_eio(registry, converted, data_root, soci_config):
    from lazyoci.estargz import EStargzIndex, parse_footer

    manifest = fetch_manifest(registry.host, "esgz/corrupt")
    layer = manifest["layers"][0]
    path = registry.blob_path(layer["digest"])
    blob = path.read_bytes()
    index = EStargzIndex.parse(blob[parse_footer(blob[-51:])[0]:])
    secret = next(index.entry(i) for i in range(len(index)) if index.entry(i).name == "secret")
    span = index.spans_for(secret.offset + 100_000, secret.offset + 100_001)[0]
    c0, c1 = index.span_compressed_range(span)
    images, snap, image, lines = _pull(data_root, soci_config, f"{registry.host}/esgz/corrupt:latest")
    try:
        view = snap.service.view_dir(layer["digest"], snap.lazy_layer(layer["digest"]).ztoc_digest)
        bad = bytearray(blob)
        bad[(c0 + c1) // 2] ^= 0x01
        path.write_bytes(bytes(bad))                      # the registry now serves a corrupted chunk
        with open(view / "secret", "rb") as f:
            f.seek(100_000)
            with pytest.raises(OSError) as e:
                f.read(4096)
            assert e.value.errno == errno.EIO
            f.seek(0)
            assert f.read(4096) == SECRET[:4096]          # an intact chunk still reads
    finally:
        path.write_bytes(blob)
        images.close()
        ServiceClient(DataRoot(data_root), soci_config).stop()


@pytest.mark.slow
def test_stargz_snapshotter_reads_a_little_of_a_200_mib_layer(registry, data_root, tmp_path):
    """`run --snapshotter stargz` of a ctr-remote image with a 200 MiB layer: a small read fetches
    under 10% of the image from the registry; `images` and `service status` say eStargz."""
    from helpers.fault_proxy import FaultProxy
    from helpers.tricky_image import BUSYBOX

    base = make_layer([Entry("bin", "dir"), Entry("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755)]
                      + [Entry(f"bin/{a}", "symlink", linkname="busybox") for a in ("sh", "head", "wc")])
    big = make_layer([Entry("data", "dir")] + [Entry(f"data/f{i}", data=os.urandom(50 << 20)) for i in range(4)])
    with converter() as cd:
        push_estargz(cd, registry.host, "esgz/big", [base, big], tmp_path)
    manifest = fetch_manifest(registry.host, "esgz/big")
    image_bytes = manifest["config"]["size"] + sum(l["size"] for l in manifest["layers"])
    assert manifest["layers"][1]["size"] > 200 << 20
    config = write_config(tmp_path / "config.yaml", extra="snapshotters:\n  - stargz\n")
    try:
        with FaultProxy(registry.host) as proxy:
            ref = f"{proxy.host}/esgz/big:latest"
            r = subprocess.run([LAZYOCI, "--root", str(data_root), "--config", str(config), "run", "--rm",
                                ref, "sh", "-c", "head -c 4096 /data/f2 | wc -c"],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == "4096"
            assert "INFO" not in r.stderr, r.stderr
            served = proxy.bytes_served
        assert served < image_bytes // 10, (served, image_bytes)
        images = subprocess.run([LAZYOCI, "--root", str(data_root), "--config", str(config), "images"],
                                capture_output=True, text=True, timeout=60).stdout
        assert "soci (estargz)" in images, images
        status = subprocess.run([LAZYOCI, "--root", str(data_root), "--config", str(config), "service",
                                 "status"], capture_output=True, text=True, timeout=60).stdout
        assert status.count("estargz") == 2, status
    finally:
        ServiceClient(DataRoot(data_root), config).stop()


def test_files_before_the_prefetch_landmark_are_fetched_at_mount(registry, data_root, tmp_path, soci_config):
    """`ctr-remote images convert --estargz-record-in` puts the recorded files first, then
    `.prefetch.landmark`: those files are fetched when the layer is mounted, before any read, in
    one request (31 chunks: more than a read's request holds); the files after it are not."""
    import json
    import time

    from helpers.fault_proxy import FaultProxy

    from lazyoci.estargz import parse_footer

    hot, cold = os.urandom(2_000_000), os.urandom(4_000_000)
    layer = make_layer([Entry("data", "dir"), Entry("data/cold", data=cold), Entry("data/hot", data=hot)])
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"path": "/data/hot"}) + "\n")
    with converter() as cd:
        from helpers.images import image_config, push_image
        push_image(registry.host, "esgz/prefetch-src", [layer], image_config([layer]), tmp_path)
        convert(cd, registry.host, "esgz/prefetch-src", "esgz/prefetch", chunk_size=65536,
                extra=("--estargz-record-in", str(record)))
    digest = fetch_manifest(registry.host, "esgz/prefetch")["layers"][0]["digest"]
    try:
        with FaultProxy(registry.host) as proxy:
            images, snap, image, lines = _pull(data_root, soci_config, f"{proxy.host}/esgz/prefetch:latest")
            images.close()
            client = ServiceClient(DataRoot(data_root), soci_config)
            hot_spans = -(-len(hot) // 65536)
            deadline = time.monotonic() + 120       # a bound for a stuck prefetch, not a speed check
            while client.status()["layers"][0]["spans_cached"] < hot_spans:
                assert time.monotonic() < deadline, client.status()
                time.sleep(0.2)
            before = proxy.count(match=f"/blobs/{digest}")
            view = snap.service.view_dir(digest, snap.lazy_layer(digest).ztoc_digest)
            assert (view / "data" / "hot").read_bytes() == hot
            assert proxy.count(match=f"/blobs/{digest}") == before       # no fetch: it was prefetched
            blob = registry.blob_path(digest).read_bytes()
            toc_offset = parse_footer(blob[-51:])[0]
            data = [r for r in proxy.log if f"/blobs/{digest}" in r.path and r.range
                    and int(r.range.split("=")[1].split("-")[0]) < toc_offset]
            assert len(data) == 1, data                                   # the prefetch region: one request
            status = client.status()["layers"][0]
            assert status["fetched_bytes"] < len(cold), status            # the cold file was not
    finally:
        ServiceClient(DataRoot(data_root), soci_config).stop()


def _push_altered(registry_host: str, repo: str, work: Path, lie: str) -> str:
    """esgz/lie with its eStargz layer made to lie (`lie`), pushed as `repo` with skopeo."""
    import hashlib
    import json

    from helpers.estargz import fetch_blob
    from lazyoci.estargz import TOC_DIGEST_ANNOTATION

    manifest = fetch_manifest(registry_host, "esgz/lie")
    desc = manifest["layers"][0]
    blob = fetch_blob(registry_host, "esgz/lie", desc["digest"])
    config = fetch_blob(registry_host, "esgz/lie", manifest["config"]["digest"])
    if lie == "annotation":             # the TOC is not the one the manifest names
        desc["annotations"][TOC_DIGEST_ANNOTATION] = "sha256:" + hashlib.sha256(b"another toc").hexdigest()
    elif lie == "footer":               # the footer points one byte past the TOC (same tar inside)
        offset = int(blob[-35:-19], 16)
        blob = blob[:-35] + b"%016x" % (offset + 1) + blob[-19:]
    elif lie == "no-annotation":        # nothing to check the TOC against: not taken for eStargz
        desc["annotations"].pop(TOC_DIGEST_ANNOTATION)
    desc["digest"], desc["size"] = "sha256:" + hashlib.sha256(blob).hexdigest(), len(blob)
    layout = work / f"layout-{lie}"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    raw = json.dumps(manifest).encode()
    for data in (blob, config, raw):
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": manifest["mediaType"], "digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
        "size": len(raw), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                    f"oci:{layout}:latest", f"docker://{registry_host}/{repo}:latest"], check=True,
                   capture_output=True)
    return desc["digest"]


@pytest.mark.parametrize("lie, says", [("annotation", "annotation says"), ("footer", "TOC"),
                                        ("no-annotation", "no SOCI index")])
def test_a_lying_estargz_layer_is_downloaded_whole(registry, converted, data_root, tmp_path, soci_config,
                                                   lie, says):
    """A TOC that is not the annotation's, a footer that points elsewhere, no annotation: one INFO
    line (why, and that nothing is lazy, as the SOCI index path says it) and the layer is downloaded whole (verified against its digest as any layer)."""
    repo = f"esgz/lie-{lie}"
    digest = _push_altered(registry.host, repo, tmp_path, lie)
    images, snap, image, lines = _pull(data_root, soci_config, f"{registry.host}/{repo}:latest")
    try:
        info = [l for l in lines if l.startswith("INFO")]
        assert len(info) == 1 and says in info[0] and "no lazy loading" in info[0], lines
        assert "Traceback" not in "".join(lines)
        assert image.snapshotter == "overlayfs" and images.blobs.has(digest)
        top = snap.unpack_image(images, image)
        assert not snap.is_lazy(top)
    finally:
        images.close()
        ServiceClient(DataRoot(data_root), soci_config).stop()


def test_a_restarted_service_serves_an_estargz_layer_again(registry, converted, data_root, soci_config):
    """The view's format is recorded with it: a service started again mounts it as eStargz."""
    images, snap, image, lines = _pull(data_root, soci_config, f"{registry.host}/esgz/lie:latest")
    images.close()
    digest = image.manifest.layers[0].digest
    view = snap.service.view_dir(digest, snap.lazy_layer(digest).ztoc_digest)
    client = ServiceClient(DataRoot(data_root), soci_config)
    try:
        assert (view / "lie.txt").read_bytes() == b"a lie\n"
        client.stop()
        client.start()
        assert [l["format"] for l in client.status()["layers"]] == ["estargz"]
        assert (view / "lie.txt").read_bytes() == b"a lie\n"
    finally:
        client.stop()


def test_ps_and_images_show_the_lazy_format(registry, converted, data_root, soci_config):
    """A container of an eStargz image: `ps` and `images` say `soci (estargz)`, `service status`
    shows each layer's format."""
    ref = f"{registry.host}/esgz/tricky:latest"

    def lz(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([LAZYOCI, "--root", str(data_root), "--config", str(soci_config), *args],
                              capture_output=True, text=True, timeout=120)

    try:
        r = lz("run", "-d", "--name", "esgz-ps", ref, "sleep", "60")
        assert r.returncode == 0, r.stderr
        ps = lz("ps").stdout
        assert "soci (estargz)" in ps, ps
        assert "soci (estargz)" in lz("images").stdout
        status = lz("service", "status").stdout
        assert "FORMAT" in status and status.count("estargz") == 3, status
    finally:
        lz("rm", "-f", "esgz-ps")
        ServiceClient(DataRoot(data_root), soci_config).stop()
