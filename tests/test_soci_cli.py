"""Finch's lazy-loading walkthrough from the command line: `lazyoci push --snapshotter soci REF` prints the
push rows, then logrus-style `INFO[SSSS] soci: ...` lines, against docker-registry 2.8."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from lazyoci.oci import mediatypes as mt

pytestmark = pytest.mark.needs_root("pulls unpack layers owned by root")

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
INFO = re.compile(r"^INFO\[\d{4}\] soci: (.*)$")


def run(root: Path, *args: str, check: bool = True, merged: bool = False) -> subprocess.CompletedProcess:
    """Run lazyoci; with `merged`, stderr (where the INFO lines go) is folded into stdout, in order."""
    if merged:
        return subprocess.run([LAZYOCI, "--root", str(root), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=check)
    return subprocess.run([LAZYOCI, "--root", str(root), *args], capture_output=True, text=True, check=check)


def skopeo_raw(ref: str) -> bytes:
    return subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
                          check=True, capture_output=True).stdout


def test_push_snapshotter_soci_walkthrough(registry, tmp_path, data_root):
    rng = random.Random(11)
    small = make_layer([Entry("etc", "dir"), Entry("etc/motd", data=b"hi\n")])
    big = make_layer([Entry("opt", "dir"),
                      Entry("opt/blob.bin", data=rng.randbytes(400_000)),
                      Entry("opt/notes.txt", data=b"notes\n" * 1000)])
    layers = [small, big]
    src_manifest = push_image(registry.host, "walkthrough/source", layers, image_config(layers), tmp_path)
    src = f"{registry.host}/walkthrough/source:latest"
    dst = f"{registry.host}/walkthrough/myimage:latest"
    run(data_root, "pull", "-q", src)
    run(data_root, "tag", src, dst)

    done = run(data_root, "push", "--snapshotter", "soci", "--soci-min-layer-size", "100000",
               "--soci-span-size", "65536", dst)
    assert all(INFO.match(l) for l in done.stderr.splitlines())   # logrus writes to stderr
    assert not any(INFO.match(l) for l in done.stdout.splitlines())
    out = done.stdout.splitlines() + done.stderr.splitlines()
    soci = [INFO.match(l).group(1) for l in out if INFO.match(l)]
    assert any(l.startswith("manifest-sha256:") for l in done.stdout.splitlines())   # the push rows
    assert soci[0] == (f"ztoc skipped - layer {small.digest} ({mt.OCI_LAYER_GZIP}) size {len(small.blob)} "
                       "is less than min-layer-size 100000")
    m = re.match(rf"^layer {big.digest} -> ztoc (sha256:[0-9a-f]{{64}})$", soci[1])
    assert m, soci[1]
    ztoc = m.group(1)
    assert soci[2] == "checking if a soci index already exists in remote repository..."
    idx = re.match(r"^pushing soci index with digest: (sha256:[0-9a-f]{64})$", soci[3]).group(1)
    assert f"pushing artifact with digest: {ztoc}" in soci
    assert f"successfully pushed artifact with digest: {ztoc}" in soci
    assert f"skipped artifact with digest: {src_manifest}" in soci      # the image manifest is there
    assert soci[-1] == f"successfully pushed artifact with digest: {idx}"

    tag = f"{registry.host}/walkthrough/myimage:sha256-{src_manifest.split(':')[1]}"
    listed = json.loads(skopeo_raw(tag))["manifests"]
    assert [(d["digest"], d["artifactType"]) for d in listed] == [(idx, mt.SOCI_INDEX_V1)]
    index = json.loads(skopeo_raw(f"{registry.host}/walkthrough/myimage@{idx}"))
    assert index["subject"]["digest"] == src_manifest
    assert index["layers"][0]["annotations"]["com.amazon.soci.span-size"] == "65536"

    # Pushing again reuses everything.
    again = run(data_root, "push", "--snapshotter", "soci", "--soci-min-layer-size", "100000",
                "--soci-span-size", "65536", dst, merged=True).stdout.splitlines()
    soci2 = [INFO.match(l).group(1) for l in again if INFO.match(l)]
    first_info = next(i for i, l in enumerate(again) if INFO.match(l))
    assert any(l.startswith("manifest-sha256:") for l in again[:first_info])   # push rows come first
    assert f"layer {big.digest} -> ztoc {ztoc} (already exists)" in soci2
    assert soci2[-1] == f"skipped artifact with digest: {idx}"
    assert not any(l.startswith("pushing artifact") for l in soci2)

    # The local commands see it.
    assert idx in run(data_root, "soci", "index", "list", "-q").stdout.split()
    info = json.loads(run(data_root, "soci", "index", "info", idx).stdout)
    assert info["subject"]["digest"] == src_manifest
    notes = run(data_root, "soci", "ztoc", "get-file", ztoc, "opt/notes.txt").stdout
    assert notes == "notes\n" * 1000


def test_push_snapshotter_soci_small_image_fails_clearly(registry, tmp_path, data_root):
    layers = [make_layer([Entry("a.txt", data=b"a")])]
    push_image(registry.host, "walkthrough/tiny", layers, image_config(layers), tmp_path)
    ref = f"{registry.host}/walkthrough/tiny:latest"
    run(data_root, "pull", "-q", ref)
    r = run(data_root, "push", "--snapshotter", "soci", ref, check=False)
    assert r.returncode != 0
    assert "no zTOCs created" in r.stderr and "min-layer-size 10485760" in r.stderr
    errors = [l for l in r.stderr.splitlines() if not INFO.match(l)]
    assert len(errors) == 1 and errors[0].startswith("lazyoci: error: ")   # one clear line, no traceback


def test_soci_create_and_push_commands(registry, tmp_path, data_root):
    rng = random.Random(5)
    layers = [make_layer([Entry("d.bin", data=rng.randbytes(200_000))])]
    manifest = push_image(registry.host, "walkthrough/cmds", layers, image_config(layers), tmp_path)
    ref = f"{registry.host}/walkthrough/cmds:latest"
    run(data_root, "pull", "-q", ref)
    created = run(data_root, "soci", "create", "--min-layer-size", "1000", ref).stdout
    idx = re.search(r"soci index: (sha256:[0-9a-f]{64})", created).group(1)
    pushed = run(data_root, "soci", "push", ref).stdout.splitlines()
    assert pushed[0] == "checking if a soci index already exists in remote repository..."
    assert pushed[-1] == f"successfully pushed artifact with digest: {idx}"
    listed = json.loads(skopeo_raw(f"{registry.host}/walkthrough/cmds:sha256-{manifest.split(':')[1]}"))
    assert [d["digest"] for d in listed["manifests"]] == [idx]
    skip = run(data_root, "soci", "push", "--existing-index", "skip", ref).stdout.splitlines()
    assert skip[-1] == (f"soci index found in remote repository with digest: {idx}: "
                        f"skipping pushing artifacts for image manifest: {manifest}")
    conv = run(data_root, "soci", "convert", "--min-layer-size", "1000", ref,
               f"{registry.host}/walkthrough/cmds:soci").stdout
    top = re.search(r"converted image index: (sha256:[0-9a-f]{64})", conv).group(1)
    v2 = re.search(r"soci index: (sha256:[0-9a-f]{64})", conv).group(1)
    inspected = json.loads(run(data_root, "image", "inspect", f"{registry.host}/walkthrough/cmds:soci").stdout)
    assert (inspected[0] if isinstance(inspected, list) else inspected)["Id"] == top

    assert run(data_root, "soci", "index", "rm", idx).stdout.strip() == idx
    assert idx not in run(data_root, "soci", "index", "list", "-q").stdout
    [ztoc] = run(data_root, "soci", "ztoc", "list", "-q").stdout.split()   # still used by the v2 index
    run(data_root, "rmi", f"{registry.host}/walkthrough/cmds:soci")
    run(data_root, "soci", "index", "rm", v2)
    # Nothing holds the zTOC any more: gc took it, and the records say so.
    assert run(data_root, "soci", "ztoc", "list", "-q").stdout.strip() == ""
