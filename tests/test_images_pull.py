"""Pull and push against a real docker-registry, cross-checked with umoci and skopeo."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image, sha, skopeo_push_layout
from helpers.store_check import assert_store_consistent, umoci_image
from lazyoci.errors import ImageNotFoundError, IntegrityError, NotFoundError, ReferenceError_, LazyociError
from lazyoci.images.progress import ProgressEvent
from lazyoci.images.service import ImageService
from lazyoci.oci.platform import Platform
from lazyoci.store.layout import DataRoot


@pytest.fixture
def svc(data_root) -> ImageService:
    s = ImageService(DataRoot(data_root))
    yield s
    s.close()


def skopeo_raw(ref: str) -> bytes:
    return subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
                          check=True, capture_output=True).stdout


@pytest.mark.needs_root("umoci unpack keeps the layers' owners")
def test_pull_umoci_image_pushed_by_skopeo(svc, registry, tmp_path, data_root):
    layout = tmp_path / "layout"
    umoci_image(layout, "v1", [{"etc/hello": b"hello\n", "bin/tool": os.urandom(200_000)},
                               {"etc/hello": b"changed\n"}])
    skopeo_push_layout(layout, f"{registry.host}/umoci/app:v1", "v1")
    index = json.loads((layout / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"]
    layout_blob = lambda d: (layout / "blobs/sha256" / d.split(":")[1]).read_bytes()
    manifest = json.loads(layout_blob(mdigest))

    events: list[ProgressEvent] = []
    image = svc.pull(f"{registry.host}/umoci/app:v1", progress=events.append)

    assert image.digest == mdigest
    assert image.manifest.raw == layout_blob(mdigest)                 # byte for byte
    assert image.manifest.config.digest == manifest["config"]["digest"]
    assert [l.digest for l in image.manifest.layers] == [l["digest"] for l in manifest["layers"]]
    for d in [mdigest, manifest["config"]["digest"]] + [l["digest"] for l in manifest["layers"]]:
        assert svc.blobs.path(d).read_bytes() == layout_blob(d)
    assert image.config.cmd == ("/bin/true",)
    keys = [e.key for e in events if e.final]
    assert f"{registry.host}/umoci/app:v1" in keys
    assert f"manifest-{mdigest}" in keys and f"config-{manifest['config']['digest']}" in keys
    assert all(f"layer-{l['digest']}" in keys for l in manifest["layers"])
    assert_store_consistent(data_root)

    # local lookups: by name, by ID prefix, by digest
    assert svc.get(image.id).digest == mdigest
    assert svc.get(f"{registry.host}/umoci/app@{mdigest}").digest == mdigest
    # a second pull finds every layer already stored
    events.clear()
    svc.pull(f"{registry.host}/umoci/app:v1", progress=events.append)
    assert {e.status for e in events if e.kind == "layer"} == {"waiting", "exists"}


def test_push_is_read_by_skopeo_with_identical_digests(svc, registry, tmp_path, data_root):
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin" / "data").write_bytes(os.urandom(150_000))
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "os-release").write_text("ID=lazyoci\n")
    ref = f"{registry.host}/pushed/app:1.0"
    image = svc.import_rootfs(rootfs, ref, ["CMD /bin/data", "ENV A=1"])
    events: list[ProgressEvent] = []
    pushed = svc.push(ref, progress=events.append)
    assert pushed == image.digest
    assert skopeo_raw(ref) == image.manifest.raw
    info = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
                                     check=True, capture_output=True).stdout)
    assert info["Digest"] == image.digest
    assert info["Layers"] == [l.digest for l in image.manifest.layers]
    assert "A=1" in info["Env"]
    out = tmp_path / "copied"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{out}:x"],
                   check=True, capture_output=True)
    idx = json.loads((out / "index.json").read_text())
    assert idx["manifests"][0]["digest"] == image.digest
    for d in [image.digest, image.manifest.config.digest] + [l.digest for l in image.manifest.layers]:
        assert (out / "blobs/sha256" / d.split(":")[1]).read_bytes() == svc.blobs.path(d).read_bytes()
    assert {e.status for e in events if e.kind == "layer"} >= {"uploading", "done"}

    # pushing again: every blob already exists; to a sibling repository: mounted
    events.clear()
    svc.push(ref, progress=events.append)
    assert {e.status for e in events if e.kind == "layer" and e.final} == {"exists"}
    svc.tag(ref, f"{registry.host}/pushed/other:1.0")
    events.clear()
    svc.push(f"{registry.host}/pushed/other:1.0", progress=events.append)
    assert {e.status for e in events if e.kind == "layer" and e.final} == {"mounted"}
    assert skopeo_raw(f"{registry.host}/pushed/other:1.0") == image.manifest.raw
    assert_store_consistent(data_root)


def _multiplatform_layout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An OCI layout whose index has linux/amd64 and linux/arm64/v8 images."""
    layout = tmp_path / "multi"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    entries, digests = [], {}

    def put(data: bytes) -> str:
        (blobs / sha(data).split(":")[1]).write_bytes(data)
        return sha(data)

    for arch, variant in (("amd64", None), ("arm64", "v8")):
        layer = make_layer([Entry(f"{arch}.txt", data=arch.encode() * 1000)])
        cfg = json.loads(image_config([layer], cmd=["/x"]))
        cfg["architecture"] = arch
        if variant:
            cfg["variant"] = variant
        cfg_raw = json.dumps(cfg).encode()
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": put(cfg_raw), "size": len(cfg_raw)},
                               "layers": [{"mediaType": layer.media_type, "digest": put(layer.blob),
                                           "size": len(layer.blob)}]}, indent=1).encode()
        plat = {"architecture": arch, "os": "linux", **({"variant": variant} if variant else {})}
        digests[arch] = put(manifest)
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": digests[arch], "size": len(manifest), "platform": plat})
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}, indent=2).encode()
    digests["index"] = put(index)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digests["index"],
         "size": len(index), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    return layout, digests


def test_multiplatform_index(svc, registry, tmp_path, data_root):
    layout, digests = _multiplatform_layout(tmp_path)
    subprocess.run(["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
                    f"oci:{layout}:latest", f"docker://{registry.host}/multi/app:latest"],
                   check=True, capture_output=True)
    ref = f"{registry.host}/multi/app:latest"
    host = svc.pull(ref)
    assert host.digest == digests["index"]
    assert host.manifest.digest == digests[Platform.host().architecture]
    arm = svc.pull(ref, platform=Platform.parse("linux/arm64"))
    assert arm.manifest.digest == digests["arm64"] and arm.config.architecture == "arm64"
    with pytest.raises(LazyociError, match="no image for platform linux/s390x"):
        svc.pull(ref, platform=Platform.parse("linux/s390x"))
    # both platforms are local now: push sends the index byte for byte
    svc.tag(ref, f"{registry.host}/multi/copy:latest")
    assert svc.push(f"{registry.host}/multi/copy:latest") == digests["index"]
    assert skopeo_raw(f"{registry.host}/multi/copy:latest") == svc.blobs.read(digests["index"])
    rows = [r for r in svc.list() if r.repository.endswith("multi/app")]
    assert sorted(r.platform for r in rows) == ["linux/amd64", "linux/arm64/v8"]
    assert_store_consistent(data_root)


def test_all_platforms(svc, registry, tmp_path, data_root):
    layout, digests = _multiplatform_layout(tmp_path)
    subprocess.run(["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
                    f"oci:{layout}:latest", f"docker://{registry.host}/multi/all:latest"],
                   check=True, capture_output=True)
    svc.pull(f"{registry.host}/multi/all:latest", all_platforms=True)
    for arch in ("amd64", "arm64"):
        assert svc.get(f"{registry.host}/multi/all:latest", Platform.parse(f"linux/{arch}")).manifest.digest \
            == digests[arch]
    assert_store_consistent(data_root)


@pytest.mark.parametrize("text", ["UPPER/case", "app@sha256:xyz", "a:b:c", "", " app", "-app", "app:"])
def test_malformed_references(svc, text):
    with pytest.raises(ReferenceError_, match="invalid reference format"):
        svc.pull(text)


def test_unknown_image_and_tag(svc, registry, data_root):
    with pytest.raises(NotFoundError):
        svc.pull(f"{registry.host}/does/not-exist:latest")
    with pytest.raises(ImageNotFoundError, match="no such image"):
        svc.get("does-not-exist")
    assert_store_consistent(data_root)


def _simple_image(registry, tmp_path, repo: str, size: int = 400_000) -> tuple[str, list]:
    layers = [make_layer([Entry("a", data=os.urandom(size))]), make_layer([Entry("b", data=b"b" * 5000)])]
    digest = push_image(registry.host, repo, layers, image_config(layers, cmd=["/a"]), tmp_path)
    return digest, layers


def test_registry_serving_wrong_bytes(svc, fresh_registry, tmp_path, data_root):
    _, layers = _simple_image(fresh_registry, tmp_path, "corrupt/app")
    path = fresh_registry.blob_path(layers[0].digest)
    original = path.read_bytes()
    path.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
    ref = f"{fresh_registry.host}/corrupt/app:latest"
    with pytest.raises(IntegrityError, match=layers[0].digest):
        svc.pull(ref)
    assert not svc.blobs.has(layers[0].digest)
    with pytest.raises(ImageNotFoundError):
        svc.get(ref)
    assert_store_consistent(data_root)
    # the registry is repaired: the next pull completes
    path.write_bytes(original)
    image = svc.pull(ref)
    assert svc.blobs.path(layers[0].digest).read_bytes() == original
    assert image.manifest.layers[0].digest == layers[0].digest
    assert_store_consistent(data_root)


def test_registry_serving_truncated_blob(svc, fresh_registry, tmp_path, data_root):
    _, layers = _simple_image(fresh_registry, tmp_path, "trunc/app")
    path = fresh_registry.blob_path(layers[0].digest)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(LazyociError) as err:
        svc.pull(f"{fresh_registry.host}/trunc/app:latest")
    assert layers[0].digest in str(err.value)
    assert_store_consistent(data_root)
    assert not svc.blobs.has(layers[0].digest)


def test_faults_through_proxy(svc, registry, tmp_path, data_root):
    from helpers.fault_proxy import Fault, FaultProxy
    _, layers = _simple_image(registry, tmp_path, "faults/app", size=600_000)
    with FaultProxy(registry.host) as proxy:
        ref = f"{proxy.host}/faults/app:latest"
        # a reset mid-blob is resumed; a 500 on the manifest is retried
        proxy.add(Fault("reset", match=f"/blobs/{layers[0].digest}", method="GET"))
        proxy.add(Fault("status", status=500, match="/manifests/", times=1))
        image = svc.pull(ref)
        assert svc.blobs.path(layers[0].digest).read_bytes() == layers[0].blob
        assert image.manifest.layers[0].digest == layers[0].digest
        svc.remove(ref)
        # bytes flipped in transit: refused, nothing kept
        proxy.add(Fault("corrupt", match=f"/blobs/{layers[0].digest}", method="GET", times=None))
        with pytest.raises(IntegrityError):
            svc.pull(ref)
        proxy.clear()
        assert_store_consistent(data_root)
        # 401 with the registry's message
        proxy.add(Fault("status", status=401, match="/manifests/", times=None, message="go away, robot"))
        with pytest.raises(LazyociError, match="go away, robot"):
            svc.pull(ref)
    assert_store_consistent(data_root)


@pytest.mark.needs_root("a tmpfs mount")
def test_disk_full_is_a_clear_error(registry, tmp_path):
    _, layers = _simple_image(registry, tmp_path, "diskfull/app", size=3_000_000)
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        svc = ImageService(DataRoot(mnt / "root"))
        with pytest.raises(LazyociError, match="disk full|database or disk is full"):
            svc.pull(f"{registry.host}/diskfull/app:latest")
        svc.close()
        assert not svc.blobs.has(layers[0].digest)
        assert_store_consistent(mnt / "root")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_push_one_platform_of_a_partial_index(svc, registry, tmp_path, data_root):
    layout, digests = _multiplatform_layout(tmp_path)
    subprocess.run(["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
                    f"oci:{layout}:latest", f"docker://{registry.host}/multi/partial:latest"],
                   check=True, capture_output=True)
    svc.pull(f"{registry.host}/multi/partial:latest", platform=Platform.parse("linux/arm64"))
    svc.tag(f"{registry.host}/multi/partial:latest", f"{registry.host}/multi/partial-copy:1")
    # only arm64 is here: the registry would refuse the index, so the arm64 manifest is pushed
    assert svc.push(f"{registry.host}/multi/partial-copy:1", platform=Platform.parse("linux/arm64")) \
        == digests["arm64"]
    assert skopeo_raw(f"{registry.host}/multi/partial-copy:1") == svc.blobs.read(digests["arm64"])
    with pytest.raises(ImageNotFoundError, match="no linux/amd64 platform locally"):
        svc.push(f"{registry.host}/multi/partial-copy:1", platform=Platform.parse("linux/amd64"))
    assert_store_consistent(data_root)


def test_lazy_layers_are_skipped_and_recorded(svc, registry, tmp_path, data_root):
    _, layers = _simple_image(registry, tmp_path, "lazy/app")
    consumed: list[str] = []

    class Consumer:
        def __init__(self, digest: str) -> None:
            self.digest, self.n = digest, 0
        def write(self, chunk: bytes) -> None:
            self.n += len(chunk)
        def finish(self) -> None:
            consumed.append(self.digest)
        def abort(self, exc: BaseException) -> None:
            raise AssertionError(exc)

    image = svc.pull(f"{registry.host}/lazy/app:latest", snapshotter="soci",
                     skip_layers=lambda d: d.digest == layers[0].digest,
                     layer_consumer=lambda d: Consumer(d.digest))
    assert image.snapshotter == "soci"
    assert not svc.blobs.has(layers[0].digest) and svc.blobs.has(layers[1].digest)
    assert consumed == [layers[1].digest]
    with pytest.raises(LazyociError, match="not stored locally"):
        svc.push(f"{registry.host}/lazy/app:latest")
    row = next(r for r in svc.list() if r.repository.endswith("lazy/app"))
    assert row.snapshotter == "soci" and row.blob_size < len(layers[0].blob)
    assert_store_consistent(data_root)


def test_docker_schema2_image(svc, registry, tmp_path, data_root):
    layers = [make_layer([Entry("d", data=os.urandom(20_000))])]
    layout = tmp_path / "v2s2"
    from helpers.images import write_oci_layout
    write_oci_layout(layout, layers, image_config(layers, cmd=["/d"]))
    ref = f"{registry.host}/docker/v2s2:latest"
    subprocess.run(["skopeo", "copy", "--format", "v2s2", "--dest-tls-verify=false", f"oci:{layout}:latest",
                    f"docker://{ref}"], check=True, capture_output=True)
    raw = skopeo_raw(ref)
    image = svc.pull(ref)
    assert image.manifest.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert image.manifest.raw == raw and image.digest == sha(raw)
    svc.tag(ref, f"{registry.host}/docker/v2s2-copy:latest")
    svc.push(f"{registry.host}/docker/v2s2-copy:latest")
    assert skopeo_raw(f"{registry.host}/docker/v2s2-copy:latest") == raw
    assert_store_consistent(data_root)


def test_an_artifact_is_not_pulled_as_an_image(svc, registry, tmp_path, data_root):
    layout = tmp_path / "artifact"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    empty, payload = b"{}", b"not a layer"
    for data in (empty, payload):
        (blobs / sha(data)[7:]).write_bytes(data)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.thing",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(empty), "size": 2},
        "layers": [{"mediaType": "application/vnd.example.payload", "digest": sha(payload),
                    "size": len(payload)}]}).encode()
    (blobs / sha(manifest)[7:]).write_bytes(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest),
         "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    skopeo_push_layout(layout, f"{registry.host}/artifact/thing:latest")
    with pytest.raises(LazyociError, match="not a container image.*application/vnd.example.thing"):
        svc.pull(f"{registry.host}/artifact/thing:latest")
    assert list(svc.blobs.digests()) == []
    assert_store_consistent(data_root)
