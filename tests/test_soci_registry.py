"""SOCI indexes against a real docker-registry 2.8: build, push (v1 + tag schema), reuse,
convert (v2), discovery order, remote create, and reading files through a zTOC.

Images are made with tarfile and pushed with skopeo (tests/helpers/images.py); what the
registry holds is read back with skopeo and plain HTTP, not with lazyoci.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from lazyoci.errors import FormatError
from lazyoci.images.service import ImageService
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import Manifest
from lazyoci.oci.reference import Reference
from lazyoci.registry.options import RegistryOptions
from lazyoci.soci import (SociBuildOptions, convert_local_image, discover_index, index_local_image,
                          index_remote_image, push_index)
from lazyoci.soci.index import (
    ANN_BUILD_TOOL, ANN_IMAGE_MANIFEST_DIGEST, ANN_INDEX_DIGEST, ANN_LAYER_DIGEST, ANN_LAYER_MEDIA_TYPE,
    ANN_SPAN_SIZE, EMPTY_CONFIG_DIGEST,
)
from lazyoci.store.layout import DataRoot

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
SMALL = SociBuildOptions(min_layer_size=1024, span_size=1 << 16)


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _text(n: int, seed: int) -> bytes:
    """Text that compresses about 2:1, so deflate blocks (span boundaries) come often."""
    rng = random.Random(seed)
    return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz   \n") for _ in range(n))


SMALL_LAYER = make_layer([Entry("etc", "dir"), Entry("etc/motd", data=b"hello\n")])
# Medium layer: ~300 KiB of text in several files, many 64 KiB spans.
MEDIUM_FILES = {f"app/file{i}.txt": _text(60_000 + i * 1000, i) for i in range(5)}
MEDIUM_LAYER = make_layer([Entry("app", "dir")] + [Entry(k, data=v) for k, v in MEDIUM_FILES.items()])


def skopeo_raw(ref: str) -> bytes:
    return subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
                          check=True, capture_output=True).stdout


def http_blob(registry, repo: str, digest: str) -> bytes:
    with urllib.request.urlopen(f"{registry.url}/v2/{repo}/blobs/{digest}") as r:
        return r.read()


def service(root: Path) -> ImageService:
    return ImageService(DataRoot(root), RegistryOptions())


@pytest.fixture(scope="module")
def big_image(registry, tmp_path_factory):
    """An image like the one of Finch's lazy-loading guide: a tiny layer (skipped) and one above the 10 MiB default (indexed)."""
    big = make_layer([Entry("data", "dir"), Entry("data/big.bin", data=_rand(11 << 20, 7)),
                      Entry("data/readme.txt", data=b"the big layer\n")])
    layers = [SMALL_LAYER, big]
    digest = push_image(registry.host, "soci/big", layers, image_config(layers, cmd=["/bin/sh"]),
                        tmp_path_factory.mktemp("big"))
    return f"{registry.host}/soci/big:latest", digest, layers


@pytest.fixture(scope="module")
def medium_image(registry, tmp_path_factory):
    layers = [SMALL_LAYER, MEDIUM_LAYER]
    digest = push_image(registry.host, "soci/medium", layers, image_config(layers, cmd=["/bin/sh"]),
                        tmp_path_factory.mktemp("medium"))
    return f"{registry.host}/soci/medium:latest", digest, layers


def test_push_v1_found_through_tag_schema_and_reused(registry, big_image, data_root):
    ref, manifest_digest, (small, big) = big_image
    images = service(data_root)
    image = images.pull(ref)
    lines: list[str] = []
    result = index_local_image(images, image, SociBuildOptions(), lines.append)
    ztoc = result.ztocs[0].ztoc
    assert lines == [
        f"ztoc skipped - layer {small.digest} ({mt.OCI_LAYER_GZIP}) size {len(small.blob)} "
        f"is less than min-layer-size 10485760",
        f"layer {big.digest} -> ztoc {ztoc.digest}",
    ]
    pushed: list[str] = []
    push_index(images.client, Reference.parse(ref), images.blobs, result.index, pushed.append)
    idx = result.index.digest
    assert pushed[:2] == ["checking if a soci index already exists in remote repository...",
                          f"pushing soci index with digest: {idx}"]
    for d in (ztoc.digest, EMPTY_CONFIG_DIGEST):
        assert f"pushing artifact with digest: {d}" in pushed
        assert f"successfully pushed artifact with digest: {d}" in pushed
    assert f"skipped artifact with digest: {manifest_digest}" in pushed   # the image manifest
    assert pushed[-2:] == [f"pushing artifact with digest: {idx}",
                           f"successfully pushed artifact with digest: {idx}"]

    # docker-registry 2.8 has no referrers API: the index is listed under the sha256-<hex> tag.
    tag_index = json.loads(skopeo_raw(f"{registry.host}/soci/big:sha256-{manifest_digest.split(':')[1]}"))
    assert tag_index["mediaType"] == mt.OCI_INDEX
    [entry] = tag_index["manifests"]
    assert entry["digest"] == idx and entry["artifactType"] == mt.SOCI_INDEX_V1
    assert entry["mediaType"] == mt.OCI_MANIFEST and entry["size"] == result.index.size

    raw = skopeo_raw(f"{registry.host}/soci/big@{idx}")
    assert raw == result.index.raw and "sha256:" + hashlib.sha256(raw).hexdigest() == idx
    obj = json.loads(raw)
    assert obj["config"] == {"mediaType": mt.SOCI_INDEX_V1, "digest": EMPTY_CONFIG_DIGEST, "size": 2}
    assert http_blob(registry, "soci/big", EMPTY_CONFIG_DIGEST) == b"{}"
    assert obj["subject"]["digest"] == manifest_digest
    assert obj["annotations"][ANN_BUILD_TOOL].startswith("lazyoci")
    [layer] = obj["layers"]
    assert layer["mediaType"] == "application/octet-stream"
    assert layer["annotations"] == {ANN_LAYER_DIGEST: big.digest, ANN_LAYER_MEDIA_TYPE: mt.OCI_LAYER_GZIP,
                                    ANN_SPAN_SIZE: str(1 << 22)}
    assert http_blob(registry, "soci/big", ztoc.digest) == images.blobs.read(ztoc.digest)

    # Second time: the zTOC is reused, the index is the same, the registry already has it.
    again: list[str] = []
    result2 = index_local_image(images, image, SociBuildOptions(), again.append)
    assert result2.index.digest == idx
    assert again[1] == f"layer {big.digest} -> ztoc {ztoc.digest} (already exists)"
    pushed2: list[str] = []
    push_index(images.client, Reference.parse(ref), images.blobs, result2.index, pushed2.append)
    assert f"[WARN] soci index found in remote repository with digest: {idx}: pushing index anyway" in pushed2
    assert pushed2[-1] == f"skipped artifact with digest: {idx}"
    assert not any(l.startswith("pushing artifact") for l in pushed2)
    assert len(json.loads(skopeo_raw(f"{registry.host}/soci/big:sha256-{manifest_digest.split(':')[1]}"))
               ["manifests"]) == 1
    # --force rebuilds the zTOC (same bytes: the builder is deterministic).
    forced: list[str] = []
    index_local_image(images, image, SociBuildOptions(force=True), forced.append)
    assert forced[1] == f"layer {big.digest} -> ztoc {ztoc.digest}"
    images.close()


def test_all_layers_below_min_size_is_a_clear_error(registry, tmp_path, data_root):
    layers = [SMALL_LAYER]
    push_image(registry.host, "soci/tiny", layers, image_config(layers), tmp_path)
    images = service(data_root)
    image = images.pull(f"{registry.host}/soci/tiny:latest")
    with pytest.raises(FormatError, match="no zTOCs created.*min-layer-size 10485760"):
        index_local_image(images, image, SociBuildOptions())
    images.close()


def test_zstd_layer_skipped_with_a_clear_line(registry, tmp_path, data_root):
    layers = [make_layer([Entry("z.bin", data=_rand(5000, 3))], "zstd"), MEDIUM_LAYER]
    push_image(registry.host, "soci/zstd", layers, image_config(layers), tmp_path)
    images = service(data_root)
    lines: list[str] = []
    result = index_local_image(images, images.pull(f"{registry.host}/soci/zstd:latest"), SMALL, lines.append)
    assert lines[0] == (f"ztoc skipped - layer {layers[0].digest} ({mt.OCI_LAYER_ZSTD}) is compressed in an "
                        'unsupported format. expect: [tar, gzip, unknown] but got "zstd"')
    assert [z.layer.digest for z in result.ztocs] == [MEDIUM_LAYER.digest]
    images.close()


def test_convert_v2_shape_push_and_discovery(registry, medium_image, data_root):
    ref, old_manifest, _ = medium_image
    images = service(data_root)
    images.pull(ref)
    dst = f"{registry.host}/soci/medium-converted:v2"
    result = convert_local_image(images, ref, dst, SMALL)
    [built] = result.indexes
    assert built.index.version == "v2" and built.index.subject is None
    new_manifest = result.manifests[old_manifest]
    assert new_manifest != old_manifest
    images.push(dst)

    top = json.loads(skopeo_raw(dst.replace(":v2", f"@{result.digest}")))
    assert top["mediaType"] == mt.OCI_INDEX
    img, sidx = top["manifests"]
    assert img["digest"] == new_manifest and img["mediaType"] == mt.OCI_MANIFEST
    assert img["platform"] == {"architecture": "amd64", "os": "linux"}
    assert img["annotations"] == {ANN_INDEX_DIGEST: built.digest}
    assert sidx == {"mediaType": mt.OCI_MANIFEST, "digest": built.digest, "size": built.index.size,
                    "annotations": {ANN_IMAGE_MANIFEST_DIGEST: new_manifest},
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "artifactType": mt.SOCI_INDEX_V2}
    m = json.loads(skopeo_raw(f"{registry.host}/soci/medium-converted@{new_manifest}"))
    assert m["annotations"][ANN_INDEX_DIGEST] == built.digest
    assert m["config"]["mediaType"] == mt.OCI_CONFIG
    old = json.loads(skopeo_raw(f"{registry.host}/soci/medium@{old_manifest}"))
    assert m["layers"] == old["layers"]          # layers untouched
    soci_raw = skopeo_raw(f"{registry.host}/soci/medium-converted@{built.digest}")
    assert json.loads(soci_raw)["config"]["mediaType"] == mt.SOCI_INDEX_V2

    # Discovery on the converted image: through the manifest annotation.
    fresh = service(data_root.parent / "fresh")
    manifest = Manifest.parse(skopeo_raw(f"{registry.host}/soci/medium-converted@{new_manifest}"))
    r = Reference.parse(dst)
    found = discover_index(fresh.client, r, manifest, new_manifest, blobs=fresh.blobs)
    assert found is not None and found.how == "annotation" and found.digest == built.digest
    assert set(found.ztocs) == {MEDIUM_LAYER.digest}
    assert fresh.blobs.has(found.ztocs[MEDIUM_LAYER.digest].digest) and fresh.blobs.has(built.digest)
    images.close()
    fresh.close()


def test_discovery_order(registry, medium_image, tmp_path, data_root):
    ref, manifest_digest, _ = medium_image
    images = service(data_root)
    image = images.pull(ref)
    r = Reference.parse(ref)
    manifest = image.manifest
    v1 = index_local_image(images, image, SMALL)
    push_index(images.client, r, images.blobs, v1.index)
    found = discover_index(images.client, r, manifest, manifest_digest)
    assert found.how == "referrers" and found.digest == v1.digest

    # An explicit digest wins over the referrers (here: a v2 index pushed on its own).
    from lazyoci.soci.push import push_manifest_graph
    v2 = index_local_image(images, image, SociBuildOptions(min_layer_size=1024, span_size=1 << 17, version="v2"))
    push_manifest_graph(images.client, r, images.blobs, v2.index.raw, mt.OCI_MANIFEST)
    found = discover_index(images.client, r, manifest, manifest_digest, explicit_digest=v2.digest)
    assert found.how == "explicit" and found.digest == v2.digest

    # An image without any index: None (every layer is then fetched whole).
    layers = [MEDIUM_LAYER]
    plain = push_image(registry.host, "soci/plain", layers, image_config(layers), tmp_path)
    plain_manifest = Manifest.parse(skopeo_raw(f"{registry.host}/soci/plain@{plain}"))
    assert discover_index(images.client, Reference.parse(f"{registry.host}/soci/plain:latest"),
                          plain_manifest, plain) is None
    images.close()


def _cli(*args: str, root: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([LAZYOCI, "--root", str(root), *args], capture_output=True, check=check)


def test_remote_create_streams_layers_and_get_file(registry, tmp_path):
    layers = [SMALL_LAYER, MEDIUM_LAYER]
    manifest_digest = push_image(registry.host, "soci/remote", layers, image_config(layers), tmp_path)
    ref = f"{registry.host}/soci/remote:latest"
    root = tmp_path / "remote-root"
    images = service(root)
    lines: list[str] = []
    result, pushed = index_remote_image(images, ref, SMALL, push=True, log=lines.append)
    assert pushed is not None and not pushed.index_skipped
    assert not images.blobs.has(MEDIUM_LAYER.digest) and not images.blobs.has(SMALL_LAYER.digest)
    ztoc_digest = result.ztocs[0].ztoc.digest
    # The same zTOC as one built from a local copy of the layer.
    local_root = tmp_path / "local-root"
    local = service(local_root)
    local_result = index_local_image(local, local.pull(ref), SMALL)
    assert local_result.ztocs[0].ztoc.digest == ztoc_digest
    found = discover_index(images.client, Reference.parse(ref), local_result_manifest(local, ref),
                           manifest_digest)
    assert found is not None and found.digest == result.digest
    images.close()
    local.close()

    name, data = next(iter(MEDIUM_FILES.items()))
    # Layer stored locally: spans come from the blob store.
    out = _cli("soci", "ztoc", "get-file", ztoc_digest, name, root=local_root)
    assert out.stdout == data
    # Layer never downloaded: spans come from the registry with Range requests.
    out = _cli("soci", "ztoc", "get-file", "--ref", ref, ztoc_digest, "/" + name, root=root)
    assert out.stdout == data
    bad = _cli("soci", "ztoc", "get-file", ztoc_digest, "app/nope", root=root, check=False)
    assert bad.returncode != 0 and b"no file" in bad.stderr

    info = json.loads(_cli("soci", "ztoc", "info", ztoc_digest, root=root).stdout)
    assert info["span_size"] == 1 << 16 and info["build_tool"].startswith("lazyoci")
    assert info["num_spans"] >= 3 and info["compressed_archive_size"] == len(MEDIUM_LAYER.blob)
    f = next(x for x in info["files"] if x["filename"].endswith(name))
    assert f["size"] == len(data) and f["type"] == "reg" and f["start_span"] <= f["end_span"]
    listed = _cli("soci", "ztoc", "list", root=root).stdout.decode()
    assert ztoc_digest in listed and MEDIUM_LAYER.digest in listed
    idx_list = _cli("soci", "index", "list", "-q", root=root).stdout.decode().split()
    assert result.digest in idx_list


def local_result_manifest(images: ImageService, ref: str) -> Manifest:
    return images.get(ref).manifest


def _push_two_platform_image(registry, repo: str, workdir: Path) -> str:
    """An OCI index with linux/amd64 and linux/arm64 manifests (distinct layers), pushed with skopeo."""
    from helpers.images import OCI_INDEX, OCI_MANIFEST, sha
    layout = workdir / "layout-multi"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        (blobs / sha(data).split(":")[1]).write_bytes(data)
        return sha(data)

    entries = []
    for arch, seed in (("amd64", 21), ("arm64", 22)):
        layer = make_layer([Entry(f"{arch}.txt", data=_text(200_000, seed))])
        cfg = json.loads(image_config([layer]))
        cfg["architecture"] = arch
        cfg_raw = json.dumps(cfg).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, "digest": put(cfg_raw), "size": len(cfg_raw)},
            "layers": [{"mediaType": layer.media_type, "digest": put(layer.blob), "size": len(layer.blob)}],
        }).encode()
        entries.append({"mediaType": OCI_MANIFEST, "digest": put(manifest), "size": len(manifest),
                        "platform": {"architecture": arch, "os": "linux"}})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_INDEX, "digest": put(index), "size": len(index),
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    subprocess.run(["skopeo", "copy", "--quiet", "--all", "--preserve-digests", "--dest-tls-verify=false",
                    f"oci:{layout}:latest", f"docker://{registry.host}/{repo}:latest"],
                   check=True, capture_output=True)
    return f"{registry.host}/{repo}:latest"


def test_all_platforms_create_and_convert(registry, tmp_path, data_root):
    from lazyoci.oci.platform import Platform
    ref = _push_two_platform_image(registry, "soci/multi", tmp_path)
    images = service(data_root)
    images.pull(ref, all_platforms=True)
    out = _cli("soci", "create", "--all-platforms", "--min-layer-size", "1000", ref, root=data_root)
    made = re.findall(r"soci index: (sha256:[0-9a-f]{64}) \((linux/\w+)\)", out.stdout.decode())
    assert sorted(p for _, p in made) == ["linux/amd64", "linux/arm64"]

    dst = f"{registry.host}/soci/multi-converted:latest"
    result = convert_local_image(images, ref, dst, SMALL, all_platforms=True)
    assert sorted(str(r.platform) for r in result.indexes) == ["linux/amd64", "linux/arm64"]
    images.push(dst)
    top = json.loads(skopeo_raw(dst))
    kinds = [(m.get("artifactType"), m["platform"]["architecture"]) for m in top["manifests"]]
    assert kinds == [(None, "amd64"), (None, "arm64"),
                     (mt.SOCI_INDEX_V2, "amd64"), (mt.SOCI_INDEX_V2, "arm64")]
    for img, soci in zip(top["manifests"][:2], top["manifests"][2:]):
        assert img["annotations"][ANN_INDEX_DIGEST] == soci["digest"]
        assert soci["annotations"][ANN_IMAGE_MANIFEST_DIGEST] == img["digest"]
    # Converting only one platform of it: the other keeps no index.
    one = convert_local_image(images, ref, f"{registry.host}/soci/multi-one:latest", SMALL,
                  platforms=[Platform("linux", "arm64")])
    assert [str(r.platform) for r in one.indexes] == ["linux/arm64"]
    images.close()


def test_corrupt_local_layer_is_refused(registry, tmp_path, data_root):
    """A zTOC is only built over bytes that match the layer digest (a valid tar with one
    changed byte of file data builds fine, so only the digest check can catch it)."""
    from lazyoci.errors import IntegrityError
    from lazyoci.soci.index_records import SociRecords
    layer = make_layer([Entry("a.txt", data=_text(50_000, 9))], "none")
    push_image(registry.host, "soci/corrupt", [layer], image_config([layer]), tmp_path)
    images = service(data_root)
    image = images.pull(f"{registry.host}/soci/corrupt:latest")
    path = images.blobs.path(layer.digest)
    data = bytearray(path.read_bytes())
    data[600] ^= 0x01                        # file content of a.txt
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        index_local_image(images, image, SMALL)
    assert SociRecords(images.db).find_ztoc(layer.digest, SMALL.span_size) is None
    images.close()


def test_lazily_pulled_image_indexes_from_the_registry(registry, medium_image, data_root):
    """Layers left in the registry by a lazy pull are streamed once, not stored."""
    ref, _, _ = medium_image
    images = service(data_root)
    image = images.pull(ref, skip_layers=lambda d: True)
    assert not images.blobs.has(MEDIUM_LAYER.digest)
    result = index_local_image(images, image, SMALL)
    assert [z.layer.digest for z in result.ztocs] == [MEDIUM_LAYER.digest]
    assert not images.blobs.has(MEDIUM_LAYER.digest)
    images.close()


def test_build_index_takes_only_the_parts_it_needs(registry, medium_image, data_root):
    """No image service: the blob store, the SOCI records and a lease are enough to index a fully
    pulled image, and the registry client is never asked for (every layer is in the store)."""
    from lazyoci.soci import build_index
    from lazyoci.soci.build import layer_source
    from lazyoci.soci.index_records import SociRecords
    from lazyoci.store.blobs import BlobStore
    from lazyoci.store.db import Database
    from lazyoci.store.image_records import ImageRecords

    ref, _, _ = medium_image
    images = service(data_root)
    try:
        image = images.pull(ref)
    finally:
        images.close()

    def no_client():
        raise AssertionError("a fully pulled image needs no registry client")

    root = DataRoot(data_root)
    blobs, db = BlobStore(root), Database(root.db_path)
    records = SociRecords(db)
    with ImageRecords(db, blobs).lease() as lease:
        result = build_index(image, layer_source(blobs, no_client, image), blobs, records, lease, SMALL)
    assert [z.layer.digest for z in result.ztocs] == [MEDIUM_LAYER.digest]
    assert [r.index_digest for r in records.indexes(manifest_digest=image.manifest.digest)] == [result.digest]
    assert blobs.has(result.digest)
