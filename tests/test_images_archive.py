"""save / load / import, cross-checked with skopeo."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image, tar_bytes
from helpers.store_check import assert_store_consistent, tar_members
from lazyoci.errors import ConfigError, FormatError, IntegrityError, StoreError
from lazyoci.images.service import ImageService
from lazyoci.store.layout import DataRoot


def service(root: Path) -> ImageService:
    return ImageService(DataRoot(root))


@pytest.fixture
def rootfs(tmp_path) -> Path:
    r = tmp_path / "rootfs"
    (r / "bin").mkdir(parents=True)
    (r / "bin" / "tool").write_bytes(os.urandom(100_000))
    (r / "bin" / "tool").chmod(0o755)
    (r / "etc").mkdir()
    (r / "etc" / "hostname").write_text("box\n")
    os.symlink("tool", r / "bin" / "link")
    os.link(r / "bin" / "tool", r / "bin" / "hard")
    return r


def test_import_directory_with_changes(tmp_path, rootfs):
    svc = service(tmp_path / "root")
    image = svc.import_rootfs(rootfs, "example.com/imported:v1", [
        'CMD ["/bin/tool", "--flag"]', "ENTRYPOINT /bin/sh", "ENV GREETING=hello PATH=/bin",
        "WORKDIR /srv", "USER 1000:1000", "LABEL a=b", "EXPOSE 8080"])
    cfg = image.config
    assert cfg.cmd == ("/bin/tool", "--flag")
    assert cfg.entrypoint == ("/bin/sh", "-c", "/bin/sh")
    assert "GREETING=hello" in cfg.env and "PATH=/bin" in cfg.env
    assert cfg.working_dir == "/srv" and cfg.user == "1000:1000" and cfg.labels == {"a": "b"}
    assert len(image.manifest.layers) == 1
    layer = image.manifest.layers[0]
    assert layer.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    raw_tar = gzip.decompress(svc.blobs.read(layer.digest))
    assert cfg.diff_ids == ("sha256:" + __import__("hashlib").sha256(raw_tar).hexdigest(),)
    with tarfile.open(fileobj=io.BytesIO(raw_tar)) as tf:
        names = {m.name: m for m in tf}
    assert names["bin/link"].issym() and names["bin/link"].linkname == "tool"
    assert names["bin/tool"].mode & 0o777 == 0o755
    assert any(names[n].islnk() for n in ("bin/hard", "bin/tool"))
    # importing the same tree again gives the same layer
    again = svc.import_rootfs(rootfs, "example.com/imported:v2", [])
    assert again.manifest.layers[0].digest == layer.digest
    assert_store_consistent(tmp_path / "root")


def test_import_tarball_and_bad_input(tmp_path):
    svc = service(tmp_path / "root")
    tarball = tmp_path / "rootfs.tar.gz"
    tarball.write_bytes(gzip.compress(tar_bytes([Entry("hello", data=b"hi")])))
    image = svc.import_rootfs(tarball, "imported/tarball", [])
    assert image.name == "docker.io/imported/tarball:latest"
    assert image.config.diff_ids[0] == make_layer([Entry("hello", data=b"hi")], "none").diff_id
    not_tar = tmp_path / "x.tar"
    not_tar.write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(FormatError, match="not a tar archive"):
        svc.import_rootfs(not_tar, "bad/one", [])
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(gzip.compress(tar_bytes([Entry("x", data=os.urandom(50_000))]))[:3000])
    with pytest.raises(FormatError):
        svc.import_rootfs(broken, "bad/two", [])
    with pytest.raises(ConfigError, match="unsupported instruction RUN"):
        svc.import_rootfs(tarball, "bad/three", ["RUN rm -rf /"])
    with pytest.raises(StoreError, match="no such file"):
        svc.import_rootfs(tmp_path / "missing", "bad/four", [])
    assert_store_consistent(tmp_path / "root")
    assert [r.repository for r in svc.list()] == ["imported/tarball"]


def test_save_load_round_trip_byte_for_byte(tmp_path, rootfs):
    a = service(tmp_path / "a")
    image = a.import_rootfs(rootfs, "127.0.0.1:5000/rt/app:v1", ["CMD /bin/tool"])
    a.tag("127.0.0.1:5000/rt/app:v1", "rt/second:latest")
    first = tmp_path / "first.tar"
    a.save(first, ["127.0.0.1:5000/rt/app:v1", "rt/second"])
    b = service(tmp_path / "b")
    loaded = b.load(first)
    assert loaded == ["127.0.0.1:5000/rt/app:v1", "docker.io/rt/second:latest"]
    got = b.get("127.0.0.1:5000/rt/app:v1")
    assert got.digest == image.digest and got.manifest.raw == image.manifest.raw
    for d in [image.digest, image.manifest.config.digest, image.manifest.layers[0].digest]:
        assert b.blobs.path(d).read_bytes() == a.blobs.path(d).read_bytes()
    second = tmp_path / "second.tar"
    b.save(second, ["127.0.0.1:5000/rt/app:v1", "rt/second"])
    assert second.read_bytes() == first.read_bytes()
    assert_store_consistent(tmp_path / "b")
    # the archive is also a docker archive: manifest.json points at the same blobs
    members = tar_members(first)
    docker = json.loads(members["manifest.json"])
    assert docker[0]["RepoTags"] == ["127.0.0.1:5000/rt/app:v1"]
    assert docker[1]["RepoTags"] == ["rt/second:latest"]
    assert docker[0]["Layers"] == [f"blobs/sha256/{image.manifest.layers[0].digest.split(':')[1]}"]


def test_saved_archive_is_read_by_skopeo_and_skopeo_docker_archive_loads(tmp_path, rootfs):
    a = service(tmp_path / "a")
    image = a.import_rootfs(rootfs, "skopeo/check:v1", ["CMD /bin/tool"])
    archive = tmp_path / "saved.tar"
    a.save(archive, ["skopeo/check:v1"])
    layout = tmp_path / "layout"
    subprocess.run(["skopeo", "copy", f"oci-archive:{archive}:v1", f"oci:{layout}:v1"],
                   check=True, capture_output=True)
    assert json.loads((layout / "index.json").read_text())["manifests"][0]["digest"] == image.digest
    # skopeo turns it into a docker archive (uncompressed layers, docker's own manifest.json)
    dockerarch = tmp_path / "docker.tar"
    subprocess.run(["skopeo", "copy", f"oci-archive:{archive}:v1", f"docker-archive:{dockerarch}:from/skopeo:t"],
                   check=True, capture_output=True)
    b = service(tmp_path / "b")
    assert b.load(dockerarch) == ["docker.io/from/skopeo:t"]
    got = b.get("from/skopeo:t")
    assert got.config.raw == image.config.raw                      # the config byte for byte
    assert got.config.diff_ids == image.config.diff_ids
    assert got.manifest.layers[0].digest == image.config.diff_ids[0]   # uncompressed: digest = diff ID
    assert_store_consistent(tmp_path / "b")
    # and lazyoci's archive of it is again readable by skopeo
    again = tmp_path / "again.tar"
    b.save(again, ["from/skopeo:t"])
    out = subprocess.run(["skopeo", "inspect", f"docker-archive:{again}"], check=True, capture_output=True)
    assert json.loads(out.stdout)["Layers"] == [got.manifest.layers[0].digest]


def test_docker_archive_from_registry_via_skopeo(tmp_path, registry):
    layers = [make_layer([Entry("one", data=os.urandom(30_000))]), make_layer([Entry("two", data=b"2")])]
    push_image(registry.host, "darchive/app", layers, image_config(layers, cmd=["/one"]), tmp_path)
    dockerarch = tmp_path / "d.tar"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{registry.host}/darchive/app:latest",
                    f"docker-archive:{dockerarch}:darchive/app:latest"], check=True, capture_output=True)
    svc = service(tmp_path / "root")
    svc.load(dockerarch)
    image = svc.get("darchive/app")
    assert [l.digest for l in image.manifest.layers] == [l.diff_id for l in layers]
    assert image.config.cmd == ("/one",)
    assert_store_consistent(tmp_path / "root")


def test_load_bad_archives(tmp_path, rootfs):
    svc = service(tmp_path / "root")
    src = service(tmp_path / "src")
    src.import_rootfs(rootfs, "bad/archive", [])
    good = tmp_path / "good.tar"
    src.save(good, ["bad/archive"])
    members = tar_members(good)

    def write(name: str, files: dict[str, bytes]) -> Path:
        p = tmp_path / name
        with tarfile.open(p, "w") as tf:
            for n, data in files.items():
                ti = tarfile.TarInfo(n)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        return p

    # a blob whose bytes do not match its name
    blob = next(n for n, d in members.items() if n.startswith("blobs/") and len(d) > 1000)
    tampered = dict(members)
    tampered[blob] = members[blob][:-1] + bytes([members[blob][-1] ^ 1])
    with pytest.raises(IntegrityError):
        svc.load(write("tampered.tar", tampered))
    # a missing layer
    missing = {n: d for n, d in members.items() if n != blob}
    with pytest.raises(FormatError, match="lacks"):
        svc.load(write("missing.tar", missing))
    # not an archive at all / no index
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(FormatError):
        svc.load(junk)
    with pytest.raises(FormatError, match="neither"):
        svc.load(write("empty.tar", {"hello.txt": b"hi"}))
    # truncated archive
    trunc = tmp_path / "trunc.tar"
    trunc.write_bytes(good.read_bytes()[:20_000])
    with pytest.raises(FormatError):
        svc.load(trunc)
    assert svc.list() == []
    assert_store_consistent(tmp_path / "root")


def test_moving_a_name_releases_the_old_image(tmp_path, rootfs):
    root = tmp_path / "root"
    svc = service(root)
    first = svc.import_rootfs(rootfs, "moving/name", [])
    (rootfs / "etc" / "hostname").write_text("changed\n")
    second = svc.import_rootfs(rootfs, "moving/name", [])
    assert first.digest != second.digest
    assert not svc.blobs.has(first.manifest.layers[0].digest)      # no orphan left behind
    assert len(list(svc.blobs.digests())) == 3
    assert_store_consistent(root)


def test_rmi_refuses_an_image_a_container_holds(tmp_path, rootfs):
    root = tmp_path / "root"
    svc = service(root)
    image = svc.import_rootfs(rootfs, "held/app", [])
    with svc.db.transaction() as c:       # what the container store records for a container
        c.execute("INSERT INTO blob_refs VALUES ('container:c1', ?)", (image.digest,))
    with pytest.raises(StoreError, match="in use by container:c1"):
        svc.remove("held/app")
    result = svc.remove("held/app", force=True)
    assert result.untagged == ("docker.io/held/app:latest",) and result.deleted == ()
    assert svc.blobs.has(image.manifest.layers[0].digest)      # the container still needs it
    assert [r.tag for r in svc.list()] == ["<none>"]
    with svc.db.transaction() as c:
        c.execute("DELETE FROM blob_refs WHERE owner='container:c1'")
    with svc.db.transaction() as c:
        assert svc.records.release_if_unnamed(c, image.digest)
    svc.gc()
    assert list(svc.blobs.digests()) == []
    assert_store_consistent(root)
