"""The lazy-loading commands as a user runs them: pull/image mount --snapshotter soci,
service and vm start/stop/status, the fallback's INFO line, and the config's snapshotters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import push_soci_index, write_config
from helpers.tricky_image import PASSWD, push_tricky_image

pytestmark = pytest.mark.needs_root("FUSE and overlay")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def _lz(root: Path, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), *args],
                       capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"lazyoci {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


def test_pull_soci_mount_and_service_commands(registry, data_root, tmp_path):
    push_tricky_image(registry.host, "lazycli/tricky", tmp_path)
    push_soci_index(registry.host, "lazycli/tricky", tmp_path)
    ref = f"{registry.host}/lazycli/tricky:latest"
    config = write_config(tmp_path / "config.yaml")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = _lz(data_root, config, "pull", "--snapshotter", "soci", ref)
        assert "manifest-sha256:" in r.stdout and "config-sha256:" in r.stdout
        assert "layer-sha256:" not in r.stdout, r.stdout          # lazy layers: no rows
        assert "INFO" not in r.stderr
        st = _lz(data_root, config, "vm", "status").stdout
        assert "running" in st and st.count("lazycli/tricky") == 3, st

        _lz(data_root, config, "image", "mount", "--snapshotter", "soci", ref, str(mnt))
        assert (mnt / "etc/passwd").read_bytes() == PASSWD
        refused = _lz(data_root, config, "service", "stop", check=False)   # would pull the rug
        assert refused.returncode != 0 and "still use lazy layers" in refused.stderr
        _lz(data_root, config, "image", "unmount", str(mnt))

        # the service stops (unmounting FUSE) and is started again on demand by `image mount`
        assert "stopped" in _lz(data_root, config, "service", "stop").stdout
        assert "not running" in _lz(data_root, config, "service", "status").stdout
        _lz(data_root, config, "image", "mount", "--snapshotter", "soci", ref, str(mnt))
        assert (mnt / "etc/passwd").read_bytes() == PASSWD
        _lz(data_root, config, "image", "unmount", str(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        _lz(data_root, config, "service", "stop", check=False)


def test_pull_soci_without_index_downloads_with_rows_and_says_why(registry, data_root, tmp_path):
    layer = make_layer([Entry("hello.txt", data=b"full pull\n")])
    push_image(registry.host, "lazycli/plain", [layer], image_config([layer]), tmp_path)
    config = write_config(tmp_path / "config.yaml")
    r = _lz(data_root, config, "pull", "--snapshotter", "soci", f"{registry.host}/lazycli/plain:latest")
    assert f"layer-{layer.digest}" in r.stdout, r.stdout
    info = [l for l in r.stderr.splitlines() if "INFO" in l]
    assert len(info) == 1 and "no SOCI index" in info[0], r.stderr


def test_config_snapshotters_bad_value_is_a_clear_error(data_root, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("snapshotters:\n  - lazy\n")
    r = _lz(data_root, config, "service", "status", check=False)
    assert r.returncode != 0
    assert f"{config}:2" in r.stderr and "lazy" in r.stderr


def test_run_soci_of_an_image_not_pulled_yet_is_lazy_and_ps_says_so(registry, data_root, tmp_path):
    """Finch's lazy-loading walkthrough: push with an index, nothing local, `run --snapshotter soci` starts
    the container without downloading the indexed layers; `ps`/`images` show soci."""
    img = push_tricky_image(registry.host, "lazycli/run", tmp_path)
    push_soci_index(registry.host, "lazycli/run", tmp_path)
    ref = f"{registry.host}/lazycli/run:latest"
    config = write_config(tmp_path / "config.yaml", extra="snapshotters:\n  - soci\n")
    try:
        r = _lz(data_root, config, "run", "-d", ref, "sleep", "30")     # soci: the config's default
        cid = r.stdout.strip()
        assert "layer-sha256:" not in r.stderr, r.stderr          # no layer rows: nothing downloaded
        st = _lz(data_root, config, "service", "status").stdout
        assert st.count("lazycli/run") == 3, st                     # its layers are served lazily
        assert not any((data_root / "blobs/sha256" / l.digest.split(":")[1]).exists() for l in img.layers)
        ps = _lz(data_root, config, "ps").stdout
        images = _lz(data_root, config, "images").stdout
        assert "SNAPSHOTTER" in ps and "SNAPSHOTTER" in images, (ps, images)
        assert "soci" in ps and "not lazy" not in ps, ps
        assert "soci" in images, images
        _lz(data_root, config, "rm", "-f", cid)
    finally:
        for c in _lz(data_root, config, "ps", "-a", "-q", check=False).stdout.split():
            _lz(data_root, config, "rm", "-f", c, check=False)
        _lz(data_root, config, "service", "stop", check=False)


def test_explicit_soci_index_digest(registry, data_root, tmp_path):
    """--soci-index-digest picks the index; a wrong one is an error, never a silent full pull."""
    push_tricky_image(registry.host, "lazycli/explicit", tmp_path)
    digest = push_soci_index(registry.host, "lazycli/explicit", tmp_path)
    ref = f"{registry.host}/lazycli/explicit:latest"
    config = write_config(tmp_path / "config.yaml")
    try:
        wrong = "sha256:" + "0" * 64
        r = _lz(data_root, config, "pull", "--snapshotter", "soci", "--soci-index-digest", wrong, ref, check=False)
        assert r.returncode != 0 and "layer-sha256:" not in r.stdout
        assert len(r.stderr.strip().splitlines()) == 1 and wrong in r.stderr, r.stderr
        r = _lz(data_root, config, "pull", "--soci-index-digest", digest, ref, check=False)
        assert r.returncode != 0 and "--snapshotter soci" in r.stderr, r.stderr
        r = _lz(data_root, config, "pull", "--snapshotter", "soci", "--soci-index-digest", digest, ref)
        assert "layer-sha256:" not in r.stdout and "INFO" not in r.stderr, (r.stdout, r.stderr)
        assert _lz(data_root, config, "service", "status").stdout.count("lazycli/explicit") == 3
    finally:
        _lz(data_root, config, "service", "stop", check=False)


def test_explicit_soci_index_digest_is_checked_even_when_the_image_is_local(registry, data_root, tmp_path):
    """run/image mount with --soci-index-digest of a local image: a malformed digest, or another
    image's index, is a one-line error, never silently ignored; the image's own index runs."""
    push_tricky_image(registry.host, "lazycli/local", tmp_path)
    digest = push_soci_index(registry.host, "lazycli/local", tmp_path)
    other = make_layer([Entry("other.bin", data=os.urandom(300_000))])
    push_image(registry.host, "lazycli/other", [other], image_config([other]), tmp_path)
    other_digest = push_soci_index(registry.host, "lazycli/other", tmp_path)
    ref = f"{registry.host}/lazycli/local:latest"
    config = write_config(tmp_path / "config.yaml")
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def one_line(r: subprocess.CompletedProcess, words: str) -> None:
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert lines[-1].startswith("lazyoci: error:") and words in lines[-1], r.stderr

    try:
        _lz(data_root, config, "pull", "--snapshotter", "soci", ref)
        for args in (("run", "--rm", "--snapshotter", "soci"), ("image", "mount", "--snapshotter", "soci")):
            tail = ("true",) if args[0] == "run" else (str(mnt),)
            one_line(_lz(data_root, config, *args, "--soci-index-digest", "sha256:bad", ref, *tail, check=False),
                     "invalid digest 'sha256:bad'")
            one_line(_lz(data_root, config, *args, "--soci-index-digest", other_digest, ref, *tail, check=False),
                     other_digest)            # not in this repository: the registry says so
        one_line(_lz(data_root, config, "run", "--rm", "--pull", "never", "--snapshotter", "soci",
                     "--soci-index-digest", digest, ref, "true", check=False), "not with --pull never")
        assert _lz(data_root, config, "run", "--rm", "--snapshotter", "soci", "--soci-index-digest", digest,
                   ref, "cat", "/etc/passwd").stdout == PASSWD.decode()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        for c in _lz(data_root, config, "ps", "-a", "-q", check=False).stdout.split():
            _lz(data_root, config, "rm", "-f", c, check=False)
        _lz(data_root, config, "service", "stop", check=False)


def test_status_after_the_service_is_killed_under_a_lazy_container(registry, data_root, tmp_path):
    """kill -9 of the service while a lazy container runs: the session holder starts it again, the
    container reads on, `service stop` names the container it would break, and removing it leaves
    everything clean."""
    import signal
    import time

    push_tricky_image(registry.host, "lazycli/killed", tmp_path)
    push_soci_index(registry.host, "lazycli/killed", tmp_path)
    ref = f"{registry.host}/lazycli/killed:latest"
    config = write_config(tmp_path / "config.yaml")
    mnt = data_root / "service" / "mnt"
    try:
        cid = _lz(data_root, config, "run", "-d", "--snapshotter", "soci", ref, "sleep", "60").stdout.strip()
        pid = int((data_root / "service" / "lazyoci.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "running (pid" not in (st := _lz(data_root, config, "service", "status").stdout) \
                or f"(pid {pid})" in st:
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        assert "stale" not in st and "FUSE sessions held" in st, st
        refused = _lz(data_root, config, "service", "stop", check=False)
        assert refused.returncode != 0 and cid[:12] in _lz(data_root, config, "ps", "-q").stdout
        name = _lz(data_root, config, "inspect", "-f", "{{.Name}}", cid).stdout.strip().lstrip("/")
        assert name in refused.stderr, refused.stderr
        assert _lz(data_root, config, "exec", cid, "cat", "/etc/passwd").stdout.encode() == PASSWD
        assert "stale" not in _lz(data_root, config, "service", "status").stdout
        _lz(data_root, config, "rm", "-f", cid)
    finally:
        for c in _lz(data_root, config, "ps", "-a", "-q", check=False).stdout.split():
            _lz(data_root, config, "rm", "-f", c, check=False)
        _lz(data_root, config, "service", "stop", "--force", check=False)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
