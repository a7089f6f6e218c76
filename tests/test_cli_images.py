"""The image commands through the real `lazyoci` executable: output shapes, one-line errors, disk space."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.registry import start_registry
from helpers.store_check import assert_store_consistent

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def run(root: Path, *args: str, input: str | None = None, env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([LAZYOCI, "--root", str(root), *args], capture_output=True, text=True,
                       input=input, env={**os.environ, **(env or {})}, timeout=120)
    if check:
        assert p.returncode == 0, f"lazyoci {' '.join(args)} failed: {p.stderr}"
    return p


def one_line_error(p: subprocess.CompletedProcess, pattern: str) -> None:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("lazyoci: error:") and "Traceback" not in p.stderr
    assert pattern in lines[0], lines[0]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.fixture(params=["cli", "service"])
def pull_path(request, tmp_path):
    """Who pulls for `lazyoci pull` into <tmp_path>/root: the CLI itself, or the service running
    for that root (whose log must then show that it pulled)."""
    root = tmp_path / "root"
    if request.param == "cli":
        yield request.param
        return
    run(root, "service", "start")
    try:
        yield request.param
    finally:
        run(root, "service", "stop", check=False)
    assert "pull of " in (root / "service/lazyoci.log").read_text()


@pytest.fixture
def image(registry, tmp_path) -> tuple[str, list]:
    layers = [make_layer([Entry("big", data=os.urandom(2_000_000))]), make_layer([Entry("etc/x", data=b"x")])]
    repo = f"cli/app{tmp_path.name[-8:].replace('_', '')}"
    push_image(registry.host, repo, layers, image_config(layers, cmd=["/big"]), tmp_path)
    return f"{registry.host}/{repo}:latest", layers


def test_errors_are_one_line(tmp_path):
    root = tmp_path / "root"
    one_line_error(run(root, "pull", "Bad/Ref:!", check=False), "invalid reference format")
    one_line_error(run(root, "rmi", "nothere", check=False), "no such image: nothere")
    one_line_error(run(root, "image", "inspect", "nothere", check=False), "no such image")
    one_line_error(run(root, "pull", "127.0.0.1:1/nobody/home:latest", check=False), "127.0.0.1:1")
    one_line_error(run(root, "pull", "--platform", "linux", "x", check=False), "invalid platform")
    one_line_error(run(root, "load", "-i", str(tmp_path / "missing.tar"), check=False), "no such file")
    one_line_error(run(root, "import", "--change", "FROB x", str(tmp_path), "x", check=False),
                   "unsupported instruction FROB")


@pytest.mark.needs_root("the pull unpacks layers owned by root")
def test_pull_images_tag_rmi_gives_disk_space_back(tmp_path, image, pull_path):
    ref, layers = image
    root = tmp_path / "root"
    p = run(root, "pull", ref)
    assert "\x1b" not in p.stdout                           # not a terminal: no escape codes
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"{ref}:") and "resolved" in lines[0]
    assert any(l.startswith("manifest-sha256:") and " done " in l for l in lines)
    assert any(l.startswith("config-sha256:") and " done " in l for l in lines)
    for layer in layers:
        assert sum(l.startswith(f"layer-{layer.digest}:") for l in lines) == 1   # each row once
    assert "|" + "+" * 38 + "|" in lines[1]
    assert lines[-1].startswith("elapsed: ") and "total:" in lines[-1] and "/s)" in lines[-1]

    q = run(root, "pull", "-q", ref)
    digest = q.stdout.strip()
    assert digest.startswith("sha256:") and len(q.stdout.splitlines()) == 1

    run(root, "tag", ref, "local/copy:v2")
    table = run(root, "images").stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "PLATFORM", "SIZE", "BLOB", "SIZE", "SNAPSHOTTER"]
    assert len(table) == 3 and any(l.startswith("local/copy ") for l in table)
    assert run(root, "images", "-q").stdout.split() == [digest[7:19]]
    assert len(run(root, "images", "local/copy").stdout.splitlines()) == 2          # header + 1 row
    assert len(run(root, "images", "local/copy:v3").stdout.splitlines()) == 1
    assert digest in run(root, "images", "--digests").stdout
    rows = [json.loads(l) for l in run(root, "image", "ls", "--format", "json").stdout.splitlines()]
    assert {r["Tag"] for r in rows} == {"latest", "v2"} and all(r["Digest"] == digest for r in rows)
    assert rows[0]["Size"] > 2_000_000 and rows[0]["BlobSize"] > 2_000_000
    inspect = json.loads(run(root, "image", "inspect", "local/copy:v2").stdout)
    assert inspect[0]["Id"] == digest

    used = du(root / "blobs") + du(root / "snapshots")
    assert used > 4_000_000                   # blobs + unpacked layers
    rm = run(root, "rmi", ref)
    assert rm.stdout.strip() == f"Untagged: {ref}"             # still named local/copy:v2
    assert du(root / "blobs") > 2_000_000
    rm = run(root, "rmi", "local/copy:v2")
    assert f"Deleted: {digest}" in rm.stdout
    assert du(root / "blobs") == 0 and du(root / "snapshots") < 100_000
    assert run(root, "images", "-q").stdout == ""
    assert_store_consistent(root)


@pytest.mark.needs_root("the pull unpacks layers owned by root")
def test_rmi_by_id_with_several_names_needs_force(tmp_path, image, pull_path):
    ref, _ = image
    root = tmp_path / "root"
    digest = run(root, "pull", "-q", ref).stdout.strip()
    run(root, "tag", ref, "other:1")
    one_line_error(run(root, "rmi", digest[7:19], check=False), "referenced by 2 names")
    out = run(root, "rmi", "-f", digest[7:19]).stdout
    assert out.count("Untagged:") == 2 and "Deleted:" in out
    assert_store_consistent(root)


def test_push_save_load_import_cli(tmp_path, registry):
    root = tmp_path / "root"
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "motd").write_text("hi\n")
    ref = f"{registry.host}/cli/imported:1"
    digest = run(root, "import", "--change", "CMD /bin/sh", str(rootfs), ref).stdout.strip()
    pushed = run(root, "push", ref)
    assert pushed.stdout.splitlines()[-1] == digest
    assert any(l.startswith("layer-sha256:") and " done " in l for l in pushed.stdout.splitlines())
    again = run(root, "push", ref)
    assert any(" exists " in l for l in again.stdout.splitlines() if l.startswith("layer-"))
    assert run(root, "push", "-q", ref).stdout.strip() == digest
    archive = tmp_path / "img.tar"
    run(root, "save", "-o", str(archive), ref)
    other = tmp_path / "other"
    assert run(other, "load", "-i", str(archive)).stdout.strip() == f"Loaded image: {ref}"
    assert json.loads(run(other, "image", "inspect", ref).stdout)[0]["Id"] == digest


@pytest.mark.needs_root("the pull unpacks layers owned by root")
def test_concurrent_pulls_into_one_root(tmp_path, image):
    ref, layers = image
    root = tmp_path / "root"
    procs = [subprocess.Popen([LAZYOCI, "--root", str(root), "pull", "-q", "--snapshotter", "overlayfs", ref],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({o[0] for o in outs}) == 1
    assert_store_consistent(root)


@pytest.mark.needs_root("the pull unpacks layers owned by root")
@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupted_pull_leaves_nothing_half_written(tmp_path, registry, how):
    from helpers.fault_proxy import FaultProxy
    from helpers.interrupt import interrupt_pull
    layers = [make_layer([Entry("big", data=os.urandom(1_000_000))])]
    push_image(registry.host, f"cli/interrupt-{how}", layers, image_config(layers), tmp_path)
    root = tmp_path / "root"
    with FaultProxy(registry.host) as proxy:
        ref = f"{proxy.host}/cli/interrupt-{how}:latest"
        # the layer's temporary file appears once its response starts: its body then takes 5 s,
        # so the signal lands mid-download however slowly this process gets to send it
        p, out, err = interrupt_pull(root, ref, proxy, layers[0].digest, how)
        blob = root / "blobs/sha256" / layers[0].digest.split(":")[1]
        assert not blob.exists()
        if how == "sigint":
            assert p.returncode == 130 and err.strip() == "lazyoci: interrupted"
            assert list((root / "tmp").iterdir()) == []
        else:
            leftovers = list((root / "tmp").iterdir())
            assert leftovers                      # a killed process cannot clean up ...
            for f in leftovers:
                os.utime(f, (time.time() - 60, time.time() - 60))
        proxy.clear()
        run(root, "pull", "-q", ref)              # ... the next pull does, and completes
    assert blob.read_bytes() == layers[0].blob
    assert_store_consistent(root)


def _layer_parts(root: Path, layer: str, before: set[Path], p: subprocess.Popen) -> set[Path]:
    """Wait for a new temporary file of the layer `layer` under <root>/tmp; the new ones."""
    tmp = root / "tmp"
    label = layer.split(":")[1][:16]
    deadline = time.monotonic() + 30
    while True:
        new = {f for f in tmp.iterdir() if f.name.startswith(label)} - before if tmp.is_dir() else set()
        if new:
            return new
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.02)


def _killed_pull(root: Path, ref: str, layer: str) -> set[Path]:
    """kill -9 of `pull ref` while it downloads `layer` (held up by the proxy); its .part files."""
    p = subprocess.Popen([LAZYOCI, "--root", str(root), "pull", ref],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parts = _layer_parts(root, layer, set(), p)
    p.kill()
    p.wait(30)
    return parts


@pytest.mark.needs_root("the pull unpacks layers owned by root")
def test_a_killed_pull_leaves_no_part_file_past_the_next_prune_or_pull(tmp_path, registry):
    """kill -9 of `pull` mid-download: the very next `image prune` or pull (of anything) removes its
    .part file, never a live pull's, and the store stays consistent."""
    from helpers.fault_proxy import Fault, FaultProxy
    big = [make_layer([Entry("big", data=os.urandom(1_000_000))])]
    small = [make_layer([Entry("small", data=b"small")])]
    push_image(registry.host, "cli/killed-big", big, image_config(big), tmp_path)
    push_image(registry.host, "cli/killed-small", small, image_config(small), tmp_path)
    root = tmp_path / "root"
    with FaultProxy(registry.host) as proxy:
        big_ref, small_ref = f"{proxy.host}/cli/killed-big:latest", f"{proxy.host}/cli/killed-small:latest"
        proxy.add(Fault("delay", seconds=5.0, match=f"/blobs/{big[0].digest}", method="GET", times=None))
        dead = _killed_pull(root, big_ref, big[0].digest)
        assert all(f.exists() and f.name.endswith(".part") for f in dead)
        run(root, "image", "prune")                           # right away: no waiting for files to age
        assert not any(f.exists() for f in dead)
        live = subprocess.Popen([LAZYOCI, "--root", str(root), "pull", "-q", big_ref],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        live_parts = _layer_parts(root, big[0].digest, set(), live)
        run(root, "image", "prune")
        assert all(f.exists() for f in live_parts)            # a concurrent pull's file is never removed
        out, err = live.communicate(timeout=60)
        assert live.returncode == 0, err
        run(root, "rmi", big_ref)
        dead = _killed_pull(root, big_ref, big[0].digest)
        proxy.clear()
        run(root, "pull", "-q", small_ref)                    # a pull of another image cleans up too
        assert not any(f.exists() for f in dead)
    assert_store_consistent(root)


@pytest.mark.needs_root("the pull unpacks layers owned by root")
def test_pull_of_a_layer_with_an_invalid_capability_xattr_is_one_line(tmp_path, registry, pull_path):
    """The unpack fails (as docker's does) naming the file and the xattr; nothing half-unpacked stays."""
    layers = [make_layer([Entry("bin", "dir"), Entry("bin/ping", data=b"x", mode=0o755,
                                                     pax={"SCHILY.xattr.security.capability": "\x01\x02"})])]
    push_image(registry.host, "cli/badcap", layers, image_config(layers), tmp_path)
    root = tmp_path / "root"
    p = run(root, "pull", "--snapshotter", "overlayfs", f"{registry.host}/cli/badcap:latest", check=False)
    one_line_error(p, "'bin/ping'")
    assert "security.capability" in p.stderr and "Errno" not in p.stderr
    assert_store_consistent(root)
    assert not [d for d in (root / "snapshots").rglob("fs") if d.is_dir()]


def test_login_logout(tmp_path):
    htpasswd = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-Bbc", str(htpasswd), "alice", "s3cret"], check=True, capture_output=True)
    reg = start_registry(tmp_path / "authreg", htpasswd=htpasswd)
    try:
        env = {"DOCKER_CONFIG": str(tmp_path / "docker")}
        root = tmp_path / "root"
        bad = run(root, "login", "-u", "alice", "--password-stdin", reg.host, input="wrong\n", env=env, check=False)
        one_line_error(bad, reg.host)
        ok = run(root, "login", "-u", "alice", "--password-stdin", reg.host, input="s3cret\n", env=env)
        assert ok.stdout.strip() == "Login Succeeded"
        assert reg.host in json.loads((tmp_path / "docker" / "config.json").read_text())["auths"]
        rootfs = tmp_path / "rootfs"
        rootfs.mkdir()
        (rootfs / "f").write_text("x")
        run(root, "import", str(rootfs), f"{reg.host}/private/app:1", env=env)
        run(root, "push", "-q", f"{reg.host}/private/app:1", env=env)
        run(root, "logout", reg.host, env=env)
        one_line_error(run(root, "push", f"{reg.host}/private/app:1", env=env, check=False), "401")
    finally:
        reg.stop()


@pytest.mark.needs_root("the pull unpacks layers owned by root")
def test_pull_through_configured_mirror(tmp_path, registry, pull_path):
    """config.registry_mirrors reaches the registry client: docker.io images come from the mirror."""
    layers = [make_layer([Entry("m", data=b"from the mirror")])]
    push_image(registry.host, "library/mirrored", layers, image_config(layers), tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(f"registry_mirrors:\n  docker.io: [\"http://{registry.host}\"]\n")
    root = tmp_path / "root"
    p = run(root, "--config", str(config), "pull", "-q", "--snapshotter", "overlayfs", "mirrored")
    assert p.stdout.strip().startswith("sha256:")
    rows = [json.loads(l) for l in run(root, "images", "--format", "json").stdout.splitlines()]
    assert rows[0]["Repository"] == "mirrored" and rows[0]["Name"] == "docker.io/library/mirrored:latest"


def test_save_to_stdout_piped_into_load_from_stdin(tmp_path):
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "f").write_bytes(os.urandom(50_000))
    a, b = tmp_path / "a", tmp_path / "b"
    digest = run(a, "import", str(rootfs), "piped/app:1").stdout.strip()
    save = subprocess.Popen([LAZYOCI, "--root", str(a), "save", "piped/app:1"], stdout=subprocess.PIPE)
    load = subprocess.run([LAZYOCI, "--root", str(b), "load"], stdin=save.stdout, capture_output=True,
                          text=True, timeout=60)
    save.stdout.close()
    assert save.wait(30) == 0 and load.returncode == 0, load.stderr
    assert load.stdout.strip() == "Loaded image: docker.io/piped/app:1"
    assert run(b, "images", "-q").stdout.strip() == digest[7:19]


def test_unnamed_image_from_skopeo_archive_and_prune(tmp_path):
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "f").write_bytes(os.urandom(300_000))
    a, b = tmp_path / "a", tmp_path / "b"
    run(a, "import", str(rootfs), "named/app:1")
    run(a, "save", "-o", str(tmp_path / "a.tar"), "named/app:1")
    # skopeo's oci-archive names the image only by its tag ("v1"): it loads as <none>
    subprocess.run(["skopeo", "copy", f"oci-archive:{tmp_path / 'a.tar'}:1", f"oci-archive:{tmp_path / 's.tar'}:v1"],
                   check=True, capture_output=True)
    loaded = run(b, "load", "-i", str(tmp_path / "s.tar")).stdout.strip()
    assert loaded.startswith("Loaded image: sha256:")
    table = run(b, "images").stdout.splitlines()
    assert table[1].split()[:2] == ["<none>", "<none>"]
    assert du(b / "blobs") > 300_000
    out = run(b, "image", "prune").stdout
    assert "Deleted: sha256:" in out and "Total reclaimed space:" in out
    assert du(b / "blobs") == 0
    assert_store_consistent(b)
