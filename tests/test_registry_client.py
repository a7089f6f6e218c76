"""The registry client against a real docker-registry 2.8: pull, push, Range, mount, chunks, referrers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess

import pytest

from helpers.fault_proxy import Fault, FaultProxy
from helpers.images import Entry, image_config, make_layer, push_image
from lazyoci.errors import FormatError, IntegrityError, NotFoundError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import Descriptor, Index, canonical_json
from lazyoci.oci.reference import Reference
from lazyoci.registry import RegistryClient, RegistryOptions, referrers_tag


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def client(tmp_path):
    c = RegistryClient(RegistryOptions(docker_config=tmp_path / "docker" / "config.json"))
    yield c
    c.close()


def push_bytes(client: RegistryClient, ref: Reference, data: bytes, **kw) -> str:
    return client.push_blob(ref, sha(data), len(data), lambda: io.BytesIO(data), **kw)


def make_manifest(client: RegistryClient, ref: Reference, layer: bytes, extra: dict | None = None,
                  config: bytes = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}') -> bytes:
    """Push config and layer blobs; return manifest bytes (not yet pushed)."""
    push_bytes(client, ref, config)
    push_bytes(client, ref, layer)
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
           "config": {"mediaType": mt.OCI_CONFIG, "digest": sha(config), "size": len(config)},
           "layers": [{"mediaType": mt.OCI_LAYER_TAR, "digest": sha(layer), "size": len(layer)}]}
    doc.update(extra or {})
    return canonical_json(doc)


def skopeo_raw(ref: str) -> bytes:
    return subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                          check=True, capture_output=True).stdout


def test_pull_image_pushed_by_skopeo(registry, client, tmp_path):
    """An image pushed by skopeo resolves and pulls with identical digests; blobs verify."""
    layer = make_layer([Entry("etc", "dir"), Entry("etc/motd", data=b"hello from skopeo\n")])
    cfg = image_config([layer], cmd=["/bin/sh"])
    mdigest = push_image(registry.host, "rc/skopeo-made", [layer], cfg, tmp_path)
    ref = Reference.parse(f"{registry.host}/rc/skopeo-made:latest")
    desc = client.resolve(ref)
    assert (desc.digest, desc.media_type) == (mdigest, mt.OCI_MANIFEST)
    raw, media_type, digest = client.get_manifest(ref)
    assert digest == mdigest and sha(raw) == mdigest and len(raw) == desc.size
    pinned = client.get_manifest(ref.with_digest(mdigest))
    assert pinned[0] == raw
    got = b"".join(client.iter_blob(ref, layer.digest, len(layer.blob)))
    assert got == layer.blob
    sink = bytearray()
    seen: list[int] = []
    client.fetch_blob(ref, sha(cfg), len(cfg), sink.extend, seen.append)
    assert bytes(sink) == cfg and seen[-1] == len(cfg)


def test_push_round_trip_checked_by_skopeo(registry, client):
    ref = Reference.parse(f"{registry.host}/rc/pushed:v1")
    layer = os.urandom(100_000)
    raw = make_manifest(client, ref, layer)
    assert push_bytes(client, ref, layer) == "exists"
    digest = client.put_manifest(ref, raw, mt.OCI_MANIFEST)
    assert digest == sha(raw)
    assert skopeo_raw(str(ref)) == raw        # stored byte for byte
    # An index that points at it, pushed by digest and by tag.
    index = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
        {"mediaType": mt.OCI_MANIFEST, "digest": digest, "size": len(raw),
         "platform": {"architecture": "amd64", "os": "linux"}}]})
    client.put_manifest(ref.with_tag("multi"), index, mt.OCI_INDEX)
    got, media_type, _ = client.get_manifest(ref.with_tag("multi"))
    assert (got, media_type) == (index, mt.OCI_INDEX)
    assert Index.parse(got).manifests[0].digest == digest
    assert skopeo_raw(f"{registry.host}/rc/pushed:multi") == index


def test_manifest_digest_mismatch_refused(registry, client):
    ref = Reference.parse(f"{registry.host}/rc/pinned:v1")
    raw = make_manifest(client, ref, b"layer-bytes")
    with pytest.raises(IntegrityError):
        client.put_manifest(ref.with_digest(sha(b"other")), raw, mt.OCI_MANIFEST)
    client.put_manifest(ref, raw, mt.OCI_MANIFEST)
    with pytest.raises(NotFoundError):
        client.resolve(ref.with_digest(sha(b"other")))


def test_not_found_errors_are_clear(registry, client):
    ref = Reference.parse(f"{registry.host}/rc/missing:nope")
    with pytest.raises(NotFoundError, match="manifest unknown") as e:
        client.get_manifest(ref)
    assert e.value.status == 404 and e.value.code == "MANIFEST_UNKNOWN"
    with pytest.raises(NotFoundError):
        client.resolve(ref)
    with pytest.raises(NotFoundError, match="blob unknown"):
        list(client.iter_blob(ref, sha(b"none")))
    assert client.blob_exists(ref, sha(b"none")) is False
    with pytest.raises(FormatError):
        client.blob_exists(ref, "sha256:xyz")


def test_range_reads(registry, client):
    ref = Reference.parse(f"{registry.host}/rc/range:v1")
    data = os.urandom(300_000)
    push_bytes(client, ref, data)
    d = sha(data)
    assert client.fetch_range(ref, d, 0, 1) == data[:1]
    assert client.fetch_range(ref, d, 12345, 200_000) == data[12345:200_000]
    assert client.fetch_range(ref, d, len(data) - 10, len(data)) == data[-10:]
    with pytest.raises(ValueError):
        client.fetch_range(ref, d, 10, 10)


def test_blob_size_and_digest_checked(registry, client):
    ref = Reference.parse(f"{registry.host}/rc/sizes:v1")
    data = b"x" * 1000
    push_bytes(client, ref, data)
    with pytest.raises(IntegrityError, match="truncated|expected 999"):
        list(client.iter_blob(ref, sha(data), 999))
    with pytest.raises(IntegrityError):
        list(client.iter_blob(ref, sha(data), 2000))


def test_cross_repository_mount(registry, client):
    src = Reference.parse(f"{registry.host}/rc/mount-src:v1")
    dst = Reference.parse(f"{registry.host}/rc/mount-dst:v1")
    data = os.urandom(50_000)
    assert push_bytes(client, src, data) == "pushed"
    assert client.blob_exists(dst, sha(data)) is False
    opened = []
    status = client.push_blob(dst, sha(data), len(data), lambda: opened.append(1) or io.BytesIO(data),
                              mount_from=src)
    assert status == "mounted" and not opened      # no byte was read, let alone sent
    assert client.blob_exists(dst, sha(data))
    # A source that lacks the blob: the registry opens a normal upload instead.
    other = os.urandom(1000)
    assert push_bytes(client, dst, other, mount_from=Reference.parse(f"{registry.host}/rc/empty:v1")) == "pushed"


def test_chunked_upload_of_large_blob(registry, tmp_path, monkeypatch):
    """A blob over 16 MiB goes up in 8 MiB PATCH chunks and reads back identical."""
    monkeypatch.setattr("lazyoci.registry.transport._BASE_BACKOFF", 0.02)
    data = os.urandom(17 * 1024 * 1024 + 123)
    path = tmp_path / "big"
    path.write_bytes(data)
    with FaultProxy(registry.host) as proxy, \
            RegistryClient(RegistryOptions(docker_config=tmp_path / "cfg.json")) as client:
        ref = Reference.parse(f"{proxy.host}/rc/chunked:v1")
        seen: list[int] = []
        assert client.push_blob(ref, sha(data), len(data), lambda: open(path, "rb"), seen.append) == "pushed"
        assert proxy.count("PATCH") == 3
        assert seen[0] == 8 * 1024 * 1024 and seen[-1] == len(data)
        # A chunk that fails (the first, then the second) is resumed from the upload status.
        for n in (1, 2):
            other = ref.with_tag(f"again{n}")
            moved = bytes([data[0] ^ n]) + data[1:]   # never equal to data (a blob that exists)
            proxy.reset_counters()
            if n == 2:   # the first PATCH passes (a zero delay is the first matching fault)
                proxy.add(Fault("delay", method="PATCH", match="/blobs/uploads/", times=1))
            proxy.add(Fault("status", status=500 + n, method="PATCH", match="/blobs/uploads/", times=1))
            assert client.push_blob(other, sha(moved), len(moved), lambda: io.BytesIO(moved)) == "pushed"
            assert proxy.count("PATCH", status=202) == 3
            assert proxy.count("GET", "/blobs/uploads/") == 1
            assert client.fetch_range(other, sha(moved), 0, 2) == moved[:2]
        h = hashlib.sha256()
        for chunk in client.iter_blob(ref, sha(data), len(data)):
            h.update(chunk)
        assert "sha256:" + h.hexdigest() == sha(data)


def test_referrers_tag_schema_on_distribution_2_8(registry, client):
    ref = Reference.parse(f"{registry.host}/rc/referred:v1")
    raw = make_manifest(client, ref, b"the image layer")
    subject = client.put_manifest(ref, raw, mt.OCI_MANIFEST)
    assert client.referrers(ref, subject) == []
    artifact_type = mt.SOCI_INDEX_V1
    descs = []
    for i in range(2):
        empty = b"{}"
        push_bytes(client, ref, empty)
        art = canonical_json({
            "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": mt.OCI_EMPTY, "digest": sha(empty), "size": 2},
            "layers": [], "subject": {"mediaType": mt.OCI_MANIFEST, "digest": subject, "size": len(raw)},
            "annotations": {"n": str(i)}})
        art_digest = client.put_manifest(ref.with_digest(sha(art)), art, mt.OCI_MANIFEST)
        desc = Descriptor(mt.OCI_MANIFEST, art_digest, len(art), artifact_type=artifact_type,
                          annotations={"n": str(i)})
        client.add_referrer(ref, subject, desc)
        client.add_referrer(ref, subject, desc)     # idempotent: deduplicated by digest
        descs.append(desc)
    # Another artifact type, filtered out below.
    unrelated = canonical_json({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": "application/x-other",
        "config": {"mediaType": mt.OCI_EMPTY, "digest": sha(b"{}"), "size": 2}, "layers": [],
        "subject": {"mediaType": mt.OCI_MANIFEST, "digest": subject, "size": len(raw)}})
    client.put_manifest(ref.with_digest(sha(unrelated)), unrelated, mt.OCI_MANIFEST)
    other = Descriptor(mt.OCI_MANIFEST, sha(unrelated), len(unrelated), artifact_type="application/x-other")
    client.add_referrer(ref, subject, other)
    found = client.referrers(ref, subject, artifact_type)
    assert [d.digest for d in found] == [d.digest for d in descs]
    assert found[1].annotations == {"n": "1"}
    assert len(client.referrers(ref, subject)) == 3
    tag_index = skopeo_raw(f"{registry.host}/rc/referred:{referrers_tag(subject)}")
    assert json.loads(tag_index)["mediaType"] == mt.OCI_INDEX
