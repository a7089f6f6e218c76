"""Prefetch artifacts: the reference's JSON shape, built by `push --snapshotter soci --prefetch-file`,
pushed, discovered by a lazy pull and used at mount; and one written as the reference writes it."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.fault_proxy import FaultProxy, spans_requested
from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import push_soci_index, running_service, write_config
from helpers.tricky_image import layer1_entries
from lazyoci.errors import ConfigError, FormatError
from lazyoci.oci import mediatypes as mt
from lazyoci.soci.prefetch import (PrefetchArtifact, PrefetchSpan, artifact_for_spans, load_prefetch_files,
                                   normalise_spans)
from lazyoci.ztoc import Ztoc

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
SPAN = 64 << 10
ANN_LAYER = "com.amazon.soci.image-layer-digest"

# The reference's Go types (soci/prefetch.go): PrefetchArtifact{Version `json:"version"`,
# PrefetchSpans `json:"prefetch_spans"`}, PrefetchSpan{StartSpan `json:"start_span"`,
# EndSpan `json:"end_span"`, Priority int `json:"priority,omitempty"`}.
ARTIFACT_FIELDS = ["version", "prefetch_spans"]
SPAN_FIELDS = ["start_span", "end_span"]
SPAN_OPTIONAL = ["priority"]


def _check_reference_shape(raw: bytes) -> dict:
    """Field by field against the reference's types, and encoded as Go's encoding/json does."""
    obj = json.loads(raw)
    assert list(obj) == ARTIFACT_FIELDS and obj["version"] == "1.0"
    assert obj["prefetch_spans"], "the reference refuses an empty artifact"
    for s in obj["prefetch_spans"]:
        assert list(s)[:2] == SPAN_FIELDS and set(s) - set(SPAN_FIELDS) <= set(SPAN_OPTIONAL)
        assert all(type(v) is int and v >= 0 for v in s.values())
        assert s.get("priority", 1) != 0, "omitempty: a zero priority is left out"
    assert raw == json.dumps(obj, separators=(",", ":")).encode(), "compact, in struct field order"
    return obj


def test_artifact_encoding_is_the_reference_s_and_bad_artifacts_are_refused(tmp_path):
    a = PrefetchArtifact("1.0", normalise_spans([PrefetchSpan(9, 9), PrefetchSpan(2, 4), PrefetchSpan(5, 5),
                                                 PrefetchSpan(3, 3)]))
    assert a.to_bytes() == b'{"version":"1.0","prefetch_spans":[{"start_span":2,"end_span":5},' \
                           b'{"start_span":9,"end_span":9}]}'
    _check_reference_shape(a.to_bytes())
    recorded = artifact_for_spans([7, 8, 2, 7, 3, 12])
    _check_reference_shape(recorded.to_bytes())
    assert recorded.spans() == [7, 8, 2, 3, 12], "the order a run read them in"
    # the reference's own example (docs/prefetch.md), with priorities
    ref = PrefetchArtifact.parse(b'{"version": "1.0", "prefetch_spans": [{"start_span": 10, "end_span": 15, '
                                 b'"priority": 1}, {"start_span": 50, "end_span": 52}]}')
    assert ref.spans() == [50, 51, 52, 10, 11, 12, 13, 14, 15]
    for bad, why in [(b"[", "not JSON"), (b'{"version":"2.0","prefetch_spans":[{"start_span":0,"end_span":0}]}',
                                         "version"),
                     (b'{"version":"1.0","prefetch_spans":[]}', "empty"),
                     (b'{"version":"1.0","prefetch_spans":[{"start_span":3,"end_span":2}]}', "invalid"),
                     (b'{"version":"1.0","prefetch_spans":[{"start_span":-1,"end_span":2}]}', "invalid"),
                     (b'{"version":"1.0","prefetch_spans":[{"start_span":"1","end_span":2}]}', "invalid")]:
        with pytest.raises(FormatError, match=why):
            PrefetchArtifact.parse(bad)
    with pytest.raises(FormatError, match="has 10 spans"):
        ref.check_spans(10, "the artifact")
    listed = tmp_path / "files.json"
    listed.write_text('["/a", " ", "b/c "]')
    assert load_prefetch_files((" /x ", ""), listed) == ("/x", "/a", "b/c")
    listed.write_text('{"a": 1}')
    with pytest.raises(ConfigError, match="JSON array of strings"):
        load_prefetch_files((), listed)


def _lz(root: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"lazyoci {' '.join(args)} exited {r.returncode}: {r.stderr}"
    return r


def _registry_json(host: str, path: str, accept: str = mt.OCI_MANIFEST) -> bytes:
    req = urllib.request.Request(f"http://{host}/v2/{path}", headers={"Accept": accept})
    with urllib.request.urlopen(req) as resp:
        return resp.read()


def _image(registry, tmp_path, repo: str):
    """A small base layer (no zTOC) and a layer of many 64 KiB spans with three files we prefetch."""
    rng = random.Random(repo)
    base = make_layer([Entry("etc", "dir"), Entry("etc/motd", data=b"hi\n")])
    big = make_layer([Entry("opt", "dir"), Entry("opt/skip.bin", data=rng.randbytes(600_000)),
                      Entry("opt/app.bin", data=rng.randbytes(200_000)),
                      Entry("opt/more.bin", data=rng.randbytes(600_000)),
                      Entry("opt/conf.txt", data=b"conf\n" * 100),
                      Entry("opt/tail.bin", data=rng.randbytes(300_000))])
    push_image(registry.host, repo, [base, big], image_config([base, big]), tmp_path)
    return base, big


def _wait_prefetched(client) -> dict:
    deadline = time.monotonic() + 60
    while True:
        [st] = [l for l in client.status()["layers"]]
        if st["prefetch_spans"] and st["prefetch_done"] == st["prefetch_spans"]:
            return st
        assert time.monotonic() < deadline, f"prefetch did not finish: {st}"
        time.sleep(0.1)


def _blob_gets(proxy: FaultProxy, digest: str) -> list:
    return [r for r in proxy.log if r.method == "GET" and f"blobs/{digest}" in r.path]


@pytest.mark.needs_root("FUSE mounts")
def test_push_with_prefetch_files_then_a_lazy_pull_prefetches_them_before_any_read(registry, data_root, tmp_path):
    _base, big = _image(registry, tmp_path, "prefetch/made")
    src = f"{registry.host}/prefetch/made:latest"
    builder = tmp_path / "builder"
    config = write_config(tmp_path / "c.yaml")
    _lz(builder, config, "pull", "-q", src)
    listed = tmp_path / "prefetch.json"
    listed.write_text('["opt/conf.txt"]')
    done = _lz(builder, config, "push", "--snapshotter", "soci", "--soci-span-size", str(SPAN),
               "--soci-min-layer-size", "100000", "--prefetch-file", "/opt/app.bin",
               "--prefetch-files-json", str(listed), src)
    assert f"Created prefetch artifact for layer {big.digest}" in done.stderr, done.stderr

    # the index in the registry lists the artifact after the zTOC, named by its layer
    manifest = json.loads(_registry_json(registry.host, "prefetch/made/manifests/latest"))
    listed_refs = json.loads(_registry_json(
        registry.host, f"prefetch/made/manifests/sha256-{_digest_of(registry.host, 'prefetch/made').split(':')[1]}",
        mt.OCI_INDEX))
    [idx] = [d["digest"] for d in listed_refs["manifests"]]
    index = json.loads(_registry_json(registry.host, f"prefetch/made/manifests/{idx}"))
    assert [l["mediaType"] for l in index["layers"]] == [mt.SOCI_LAYER, mt.SOCI_PREFETCH]
    pdesc = index["layers"][1]
    assert pdesc["annotations"] == {ANN_LAYER: big.digest}
    raw = _registry_json(registry.host, f"prefetch/made/blobs/{pdesc['digest']}")
    assert len(raw) == pdesc["size"]
    obj = _check_reference_shape(raw)
    ztoc = Ztoc.parse(_registry_json(registry.host, f"prefetch/made/blobs/{index['layers'][0]['digest']}"))
    wanted = set()
    for name in ("opt/app.bin", "opt/conf.txt", "opt"):     # the files, and the header of their directory
        e = next(ztoc.entry(i) for i in range(len(ztoc)) if ztoc.entry(i).name.rstrip("/") == name)
        wanted |= set(ztoc.spans_for(max(e.offset - 512, 0), e.offset + max(e.size, 1)))
    named = {i for s in obj["prefetch_spans"] for i in range(s["start_span"], s["end_span"] + 1)}
    assert named == wanted and len(named) < ztoc.num_spans / 2
    assert manifest["layers"][1]["digest"] == big.digest
    # the reference's inspection commands see it in the builder's store
    ls = _lz(builder, config, "soci", "prefetch", "ls").stdout.splitlines()
    assert ls[0].split() == ["DIGEST", "LAYER", "DIGEST", "SPANS", "CREATED"]
    assert ls[1].split()[:3] == [pdesc["digest"], big.digest, str(len(named))]
    info = _lz(builder, config, "soci", "prefetch", "info", pdesc["digest"]).stdout
    assert f"Layer Digest:  {big.digest}" in info and f"Total spans to prefetch: {len(named)}" in info
    # soci convert takes the same flags: its v2 index carries the same artifact
    conv = _lz(builder, config, "soci", "convert", "--span-size", str(SPAN), "--min-layer-size", "100000",
               "--prefetch-file", "/opt/app.bin", "--prefetch-files-json", str(listed), src,
               f"{registry.host}/prefetch/made:soci").stdout
    v2 = re.search(r"soci index: (sha256:[0-9a-f]{64})", conv).group(1)
    v2_index = json.loads(_lz(builder, config, "soci", "index", "info", v2).stdout)
    assert [l["mediaType"] for l in v2_index["layers"]] == [mt.SOCI_LAYER, mt.SOCI_PREFETCH]
    assert v2_index["layers"][1]["digest"] == pdesc["digest"]
    # and so does `soci create --remote`, which streams the layers from the registry
    remote = _lz(tmp_path / "remote-root", config, "soci", "create", "--remote", "--span-size", str(SPAN),
                 "--min-layer-size", "100000", "--prefetch-file", "/opt/app.bin", "--prefetch-files-json",
                 str(listed), src).stdout
    assert re.search(r"soci index: (sha256:[0-9a-f]{64})", remote).group(1) == idx
    _lazy_pull_prefetches(registry, data_root, tmp_path, "prefetch/made", big, ztoc, named,
                          {"opt/app.bin": 200_000, "opt/conf.txt": 500})


def _digest_of(host: str, repo: str) -> str:
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/latest", method="HEAD",
                                 headers={"Accept": mt.OCI_MANIFEST})
    with urllib.request.urlopen(req) as resp:
        return resp.headers["Docker-Content-Digest"]


def _lazy_pull_prefetches(registry, data_root, tmp_path, repo: str, big, ztoc: Ztoc, named: set[int],
                          files: dict[str, int], index_digest: str | None = None) -> None:
    """A lazy pull through a counting proxy fetches the named spans with no read at all; reading
    the files then needs nothing more from the registry."""
    config = write_config(tmp_path / "lazy.yaml")
    with FaultProxy(registry.host) as proxy:
        with running_service(data_root, config) as client:
            _lz(data_root, config, "pull", "--snapshotter", "soci", f"{proxy.host}/{repo}:latest",
                *(["--soci-index-digest", index_digest] if index_digest else []))
            st = _wait_prefetched(client)
            fetched = spans_requested(ztoc, _blob_gets(proxy, big.digest))
            assert sorted(fetched) == sorted(named), "each named span once, nothing else"
            assert st["prefetch_spans"] == len(named) and st["unread_spans"] == len(named)
            zdigest = st["ztoc_digest"]
            view = client.paths.view_dir(big.digest, zdigest)
            before = len(_blob_gets(proxy, big.digest))
            for name, size in files.items():
                assert len((view / name).read_bytes()) == size
            assert len(_blob_gets(proxy, big.digest)) == before, "the reads found every span prefetched"
            st = client.status()["layers"][0]
            assert st["unread_spans"] == 0
            shown = subprocess.run([LAZYOCI, "--root", str(data_root), "--config", str(config), "service",
                                    "status"], capture_output=True, text=True, check=True).stdout
            assert f"{len(named)}/{len(named)}" in shown and "PREFETCH" in shown


@pytest.mark.needs_root("FUSE mounts")
def test_an_artifact_written_as_the_reference_writes_it_is_used(registry, data_root, tmp_path):
    from lazyoci.images.service import ImageService
    from lazyoci.oci.manifest import Descriptor
    from lazyoci.oci.reference import Reference
    from lazyoci.soci import SociBuildOptions, index_local_image, make_index, push_index
    from lazyoci.store.layout import DataRoot

    _base, big = _image(registry, tmp_path, "prefetch/reference")
    ref = f"{registry.host}/prefetch/reference:latest"
    images = ImageService(DataRoot(tmp_path / "builder"))
    try:
        image = images.pull(ref)
        built = index_local_image(images, image, SociBuildOptions(span_size=SPAN, min_layer_size=100_000))
        ztoc = Ztoc.parse(images.blobs.read(built.index.ztocs[0].digest))
        e = next(ztoc.entry(i) for i in range(len(ztoc)) if ztoc.entry(i).name == "opt/tail.bin")
        first, last = ztoc.spans_for(e.offset - 512, e.offset + e.size)[0], ztoc.spans_for(e.offset, e.offset + e.size)[-1]
        # as the reference's MarshalPrefetchArtifact writes it: compact, its field order, priority omitted at 0
        raw = (f'{{"version":"1.0","prefetch_spans":[{{"start_span":{first},"end_span":{last}}},'
               f'{{"start_span":0,"end_span":0,"priority":1}}]}}').encode()
        digest = images.blobs.put_bytes(raw)
        artifact = Descriptor(mt.SOCI_PREFETCH, digest, len(raw), annotations={ANN_LAYER: big.digest})
        index = make_index("v1", [built.index.ztocs[0], artifact], built.manifest, "soci-snapshotter")
        images.blobs.put_bytes(index.raw, index.digest)
        push_index(images.client, Reference.parse(ref), images.blobs, index)
    finally:
        images.close()
    named = set(range(first, last + 1)) | {0}
    _lazy_pull_prefetches(registry, data_root, tmp_path, "prefetch/reference", big, ztoc, named,
                          {"opt/tail.bin": 300_000})


def _spans_of(ztoc: Ztoc, name: str, header: bool = True) -> set[int]:
    e = next(ztoc.entry(i) for i in range(len(ztoc)) if ztoc.entry(i).name.rstrip("/") == name)
    return set(ztoc.spans_for(max(e.offset - (512 if header else 0), 0), e.offset + max(e.size, 1)))


@pytest.mark.needs_root("runs a container on lazy layers")
def test_optimize_records_the_spans_a_run_reads_and_a_lazy_pull_prefetches_them(registry, data_root, tmp_path):
    rng = random.Random(7)
    base = make_layer(layer1_entries(), "gzip")      # busybox: below the minimum size, unpacked
    big = make_layer([Entry("opt", "dir"), Entry("opt/skip.bin", data=rng.randbytes(600_000)),
                      Entry("opt/app.bin", data=rng.randbytes(200_000)),
                      Entry("opt/more.bin", data=rng.randbytes(600_000)),
                      Entry("opt/tail.bin", data=rng.randbytes(300_000))])
    push_image(registry.host, "prefetch/optimize", [base, big], image_config([base, big]), tmp_path)
    old = push_soci_index(registry.host, "prefetch/optimize", tmp_path, span_size=SPAN,
                          min_layer_size=len(base.blob) + 1)
    ref = f"{registry.host}/prefetch/optimize:latest"
    config = write_config(tmp_path / "opt.yaml")
    r = _lz(data_root, config, "soci", "optimize", ref, "--", "sh", "-c", "cat /opt/tail.bin /opt/app.bin >/dev/null")
    new = re.search(r"soci index: (sha256:[0-9a-f]{64}) \(replaces (sha256:[0-9a-f]{64})", r.stdout)
    assert new and new.group(2) == old, r.stdout + r.stderr
    assert not list((data_root / "tmp").glob("optimize-*")), "the recorder's data root is gone"

    index = json.loads(_registry_json(registry.host, f"prefetch/optimize/manifests/{new.group(1)}"))
    kinds = [l["mediaType"] for l in index["layers"]]
    n = kinds.count(mt.SOCI_LAYER)
    assert n >= 1 and kinds == [mt.SOCI_LAYER] * n + [mt.SOCI_PREFETCH] * (len(kinds) - n), kinds
    [zdesc] = [l for l in index["layers"] if l["mediaType"] == mt.SOCI_LAYER and
               l["annotations"][ANN_LAYER] == big.digest]
    [pdesc] = [l for l in index["layers"] if l["mediaType"] == mt.SOCI_PREFETCH and
               l["annotations"] == {ANN_LAYER: big.digest}]
    ztoc = Ztoc.parse(_registry_json(registry.host, f"prefetch/optimize/blobs/{zdesc['digest']}"))
    obj = _check_reference_shape(_registry_json(registry.host, f"prefetch/optimize/blobs/{pdesc['digest']}"))
    named = [i for s in sorted(obj["prefetch_spans"], key=lambda s: s.get("priority", 0))
             for i in range(s["start_span"], s["end_span"] + 1)]
    read = _spans_of(ztoc, "opt/tail.bin") | _spans_of(ztoc, "opt/app.bin") | _spans_of(ztoc, "opt")
    assert read <= set(named), f"spans read {sorted(read)}, recorded {named}"
    untouched = (_spans_of(ztoc, "opt/skip.bin", False) | _spans_of(ztoc, "opt/more.bin", False)) - read
    assert untouched and not untouched & set(named), "only what the run read is recorded"
    assert named.index(min(_spans_of(ztoc, "opt/tail.bin", False))) < \
        named.index(min(_spans_of(ztoc, "opt/app.bin", False))), "in the order the run read them"
    # the layer was indexed again, its spans laid out around the reads: the unread files' bytes
    # lie in spans of their own, longer than the index's span size
    old_index = json.loads(_registry_json(registry.host, f"prefetch/optimize/manifests/{old}"))
    [old_z] = [l for l in old_index["layers"] if l["mediaType"] == mt.SOCI_LAYER and
               l["annotations"][ANN_LAYER] == big.digest]
    assert zdesc["digest"] != old_z["digest"] and "laid out around" in r.stderr
    assert zdesc["annotations"] == old_z["annotations"]
    skip = next(ztoc.entry(i) for i in range(len(ztoc)) if ztoc.entry(i).name == "opt/skip.bin")
    assert any(ztoc.span_uncompressed_range(i)[1] - ztoc.span_uncompressed_range(i)[0] > SPAN
               for i in ztoc.spans_for(skip.offset + 200_000, skip.offset + 400_000))

    _lazy_pull_prefetches(registry, data_root, tmp_path, "prefetch/optimize", big, ztoc, set(named),
                          {"opt/app.bin": 200_000, "opt/tail.bin": 300_000}, new.group(1))
    # --keep-spans records the same way and keeps the index's zTOC
    r = _lz(data_root, config, "soci", "optimize", "--keep-spans", "--soci-index-digest", old, ref,
            "--", "sh", "-c", "cat /opt/tail.bin >/dev/null")
    kept = re.search(r"soci index: (sha256:[0-9a-f]{64})", r.stdout)
    index = json.loads(_registry_json(registry.host, f"prefetch/optimize/manifests/{kept.group(1)}"))
    assert [l["digest"] for l in index["layers"] if l["mediaType"] == mt.SOCI_LAYER] == \
        [l["digest"] for l in old_index["layers"] if l["mediaType"] == mt.SOCI_LAYER]
