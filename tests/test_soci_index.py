"""SOCI index manifests and the v2 conversion shape: pure JSON, checked field by field."""

from __future__ import annotations

import hashlib
import json

import pytest

from lazyoci.errors import FormatError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import Descriptor, Index, Manifest
from lazyoci.oci.platform import Platform
from lazyoci.soci.v2_documents import PlatformIndex, convert_shape
from lazyoci.soci.index import (
    ANN_BUILD_TOOL, ANN_IMAGE_MANIFEST_DIGEST, ANN_INDEX_DIGEST, ANN_LAYER_DIGEST, ANN_LAYER_MEDIA_TYPE,
    ANN_SPAN_SIZE, EMPTY_CONFIG, EMPTY_CONFIG_DIGEST, SociIndex, make_index, ztoc_descriptor,
)


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


LAYER_A = Descriptor(mt.DOCKER_LAYER_GZIP, sha(b"layer-a"), 20 << 20)
LAYER_B = Descriptor(mt.OCI_LAYER_GZIP, sha(b"layer-b"), 30 << 20)
SUBJECT = Descriptor(mt.DOCKER_MANIFEST, sha(b"manifest"), 1234)


def test_empty_config_digest_is_the_two_byte_object():
    assert sha(EMPTY_CONFIG) == EMPTY_CONFIG_DIGEST and len(EMPTY_CONFIG) == 2


def test_v1_index_shape():
    z = [ztoc_descriptor(sha(b"z1"), 111, LAYER_A, 1 << 22), ztoc_descriptor(sha(b"z2"), 222, LAYER_B, 1 << 22)]
    idx = make_index("v1", z, SUBJECT, "lazyoci v0.1.0")
    obj = json.loads(idx.raw)
    assert list(obj) == ["schemaVersion", "mediaType", "config", "layers", "subject", "annotations"]
    assert obj["schemaVersion"] == 2 and obj["mediaType"] == mt.OCI_MANIFEST
    assert obj["config"] == {"mediaType": mt.SOCI_INDEX_V1, "digest": EMPTY_CONFIG_DIGEST, "size": 2}
    assert obj["subject"] == {"mediaType": mt.DOCKER_MANIFEST, "digest": SUBJECT.digest, "size": 1234}
    assert obj["annotations"] == {ANN_BUILD_TOOL: "lazyoci v0.1.0"}
    assert "artifactType" not in obj  # the reference leaves it out; registries use config.mediaType
    l0 = obj["layers"][0]
    assert list(l0) == ["mediaType", "digest", "size", "annotations"]
    assert l0["mediaType"] == "application/octet-stream" and l0["digest"] == sha(b"z1") and l0["size"] == 111
    assert l0["annotations"] == {ANN_LAYER_DIGEST: LAYER_A.digest, ANN_LAYER_MEDIA_TYPE: mt.DOCKER_LAYER_GZIP,
                                 ANN_SPAN_SIZE: "4194304"}
    assert list(l0["annotations"]) == sorted(l0["annotations"])  # Go sorts map keys
    assert obj["layers"][1]["annotations"][ANN_LAYER_DIGEST] == LAYER_B.digest
    assert idx.raw == json.dumps(obj, separators=(",", ":")).encode()  # compact like Go
    assert idx.version == "v1" and idx.digest == sha(idx.raw)
    assert idx.layer_map() == {LAYER_A.digest: z[0], LAYER_B.digest: z[1]}
    d = idx.descriptor()
    assert d.artifact_type == mt.SOCI_INDEX_V1 and d.media_type == mt.OCI_MANIFEST and d.size == len(idx.raw)


def test_v2_index_has_no_subject():
    idx = make_index("v2", [ztoc_descriptor(sha(b"z1"), 1, LAYER_A, 1 << 20)], None, "t")
    obj = json.loads(idx.raw)
    assert "subject" not in obj and obj["config"]["mediaType"] == mt.SOCI_INDEX_V2
    assert obj["layers"][0]["annotations"][ANN_SPAN_SIZE] == "1048576"
    assert SociIndex.parse(idx.raw).version == "v2"


def test_zero_ztocs_is_a_clear_error():
    with pytest.raises(FormatError, match="no zTOCs"):
        make_index("v1", [], SUBJECT, "t")


def test_parse_reference_written_index():
    # Bytes in the shape soci v0.x writes (Go encoding/json of ocispec.Manifest).
    raw = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        '"config":{"mediaType":"application/vnd.amazon.soci.index.v1+json",'
        f'"digest":"{EMPTY_CONFIG_DIGEST}","size":2}},'
        '"layers":[{"mediaType":"application/octet-stream",'
        f'"digest":"{sha(b"z")}","size":5,"annotations":{{'
        f'"com.amazon.soci.image-layer-digest":"{LAYER_A.digest}",'
        '"com.amazon.soci.image-layer-mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip",'
        '"com.amazon.soci.span-size":"4194304"}},'
        f'{{"mediaType":"application/vnd.amazon.soci.prefetch.v1+json","digest":"{sha(b"p")}","size":9}}],'
        f'"subject":{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
        f'"digest":"{SUBJECT.digest}","size":1234}},'
        '"annotations":{"com.amazon.soci.build-tool-identifier":"AWS SOCI CLI v0.2"}}'
    ).encode()
    idx = SociIndex.parse(raw)
    assert idx.build_tool == "AWS SOCI CLI v0.2" and idx.version == "v1"
    assert idx.subject.digest == SUBJECT.digest
    assert [d.digest for d in idx.ztocs] == [sha(b"z")] and len(idx.prefetch) == 1
    assert idx.ztoc_for_layer(LAYER_A.digest).size == 5 and idx.ztoc_for_layer(LAYER_B.digest) is None


@pytest.mark.parametrize("mutate,msg", [
    (lambda o: o["config"].update(mediaType="application/vnd.oci.image.config.v1+json"), "not a SOCI index"),
    (lambda o: o["layers"][0]["annotations"].pop(ANN_LAYER_DIGEST), "lacks"),
    (lambda o: o["layers"][0].update(mediaType="application/x-foo"), "unexpected media type"),
    (lambda o: o["layers"][0]["annotations"].update({ANN_SPAN_SIZE: "-1"}), "span size"),
    (lambda o: o["layers"][0]["annotations"].update({ANN_SPAN_SIZE: "4\u00b2"}), "span size"),   # a digit to isdigit, not to int
    (lambda o: o["layers"][0]["annotations"].update({ANN_SPAN_SIZE: "9" * 5000}), "span size"),  # over int's 4,300 digits
    (lambda o: o["layers"][0]["annotations"].update({ANN_SPAN_SIZE: str(128 << 20)}), "span size"),
    (lambda o: o["layers"][0]["annotations"].update({ANN_LAYER_DIGEST: "sha256:zz"}), "invalid digest"),
    (lambda o: o.pop("subject"), "subject"),
    (lambda o: o["layers"].append(dict(o["layers"][0], digest=sha(b"other"))), "two different zTOCs"),
])
def test_parse_rejects_malformed(mutate, msg):
    obj = json.loads(make_index("v1", [ztoc_descriptor(sha(b"z"), 3, LAYER_A, 1 << 22)], SUBJECT, "t").raw)
    mutate(obj)
    with pytest.raises(FormatError, match=msg):
        SociIndex.parse(json.dumps(obj).encode())


def test_parse_rejects_non_json():
    with pytest.raises(FormatError):
        SociIndex.parse(b"\x00not json")


def _docker_manifest() -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST,
        "config": {"mediaType": mt.DOCKER_CONFIG, "digest": sha(b"cfg"), "size": 3},
        "layers": [LAYER_A.to_json(), {"mediaType": mt.DOCKER_LAYER_GZIP, "digest": sha(b"small"), "size": 9}],
    }, indent=2).encode()


def test_convert_single_platform_wraps_in_oci_index():
    raw = _docker_manifest()
    amd64 = Platform("linux", "amd64")
    soci = make_index("v2", [ztoc_descriptor(sha(b"z"), 3, LAYER_A, 1 << 22)], None, "t")
    shape = convert_shape(raw, mt.DOCKER_MANIFEST, amd64, {}, [PlatformIndex(sha(raw), amd64, soci)])
    top = json.loads(shape.index_raw)
    assert top["schemaVersion"] == 2 and top["mediaType"] == mt.OCI_INDEX
    img, sidx = top["manifests"]
    new = shape.renamed[sha(raw)]
    assert img == {"mediaType": mt.OCI_MANIFEST, "digest": new, "size": len(shape.manifests[new]),
                   "annotations": {ANN_INDEX_DIGEST: soci.digest},
                   "platform": {"architecture": "amd64", "os": "linux"}}
    assert list(sidx) == ["mediaType", "digest", "size", "annotations", "platform", "artifactType"]
    assert sidx == {"mediaType": mt.OCI_MANIFEST, "digest": soci.digest, "size": soci.size,
                    "annotations": {ANN_IMAGE_MANIFEST_DIGEST: new},
                    "platform": {"architecture": "amd64", "os": "linux"}, "artifactType": mt.SOCI_INDEX_V2}
    m = Manifest.parse(shape.manifests[new])
    assert m.media_type == mt.OCI_MANIFEST and m.config.media_type == mt.OCI_CONFIG
    assert m.config.digest == sha(b"cfg")
    # Layers untouched, media types included (the reference keeps Docker layer types).
    old = Manifest.parse(raw)
    assert [(l.digest, l.size, l.media_type) for l in m.layers] == \
        [(l.digest, l.size, l.media_type) for l in old.layers]
    assert m.annotations == {ANN_INDEX_DIGEST: soci.digest}
    Index.parse(shape.index_raw)  # readable by lazyoci's own model


def test_convert_multi_platform_keeps_missing_platforms_and_replaces_old_index():
    raw = _docker_manifest()
    other = sha(b"arm64-manifest-not-pulled")
    amd64 = Platform("linux", "amd64")
    stale = {"mediaType": mt.OCI_MANIFEST, "digest": sha(b"old-soci"), "size": 10,
             "artifactType": mt.SOCI_INDEX_V2, "platform": {"architecture": "amd64", "os": "linux"}}
    top_raw = json.dumps({
        "schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST_LIST,
        "manifests": [
            {"mediaType": mt.DOCKER_MANIFEST, "digest": sha(raw), "size": len(raw),
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": mt.DOCKER_MANIFEST, "digest": other, "size": 99,
             "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
            stale,
        ]}).encode()
    soci = make_index("v2", [ztoc_descriptor(sha(b"z"), 3, LAYER_A, 1 << 22)], None, "t")
    shape = convert_shape(top_raw, mt.DOCKER_MANIFEST_LIST, None, {sha(raw): raw},
                          [PlatformIndex(sha(raw), amd64, soci)])
    top = json.loads(shape.index_raw)
    assert top["mediaType"] == mt.OCI_INDEX
    assert [m["digest"] for m in top["manifests"]] == [shape.renamed[sha(raw)], other, soci.digest]
    assert top["manifests"][1]["mediaType"] == mt.DOCKER_MANIFEST  # not local: untouched
    assert top["manifests"][2]["artifactType"] == mt.SOCI_INDEX_V2


def test_convert_without_any_index_is_an_error():
    with pytest.raises(FormatError, match="no SOCI index"):
        convert_shape(_docker_manifest(), mt.DOCKER_MANIFEST, Platform("linux", "amd64"), {}, [])


def test_public_api_builds_and_parses_a_ztoc_from_a_file_object():
    import gzip
    import io
    import random

    import lazyoci.soci as soci
    from helpers.images import Entry, tar_bytes

    data = random.Random(3).randbytes(50_000)
    blob = gzip.compress(tar_bytes([Entry("d.bin", data=data)]), mtime=0)
    z = soci.parse_ztoc(soci.build_ztoc(io.BytesIO(blob), "gzip", span_size=1 << 16))
    assert z.compressed_size == len(blob) and len(z) == 1
    assert z.entry(0).name.endswith("d.bin") and z.entry(0).size == len(data)
    with pytest.raises(FormatError):
        soci.parse_ztoc(b"not a ztoc")
