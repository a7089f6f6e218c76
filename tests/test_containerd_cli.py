"""The `containerd:` config section and `lazyoci containerd pull`'s errors: one line each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from lazyoci.config import load_config
from lazyoci.containerd.settings import ContainerdConfig
from lazyoci.errors import ConfigError

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def test_containerd_section_defaults_and_values(tmp_path):
    assert load_config(None).containerd == ContainerdConfig()
    assert ContainerdConfig().snapshotters == {"soci": "soci", "lazyoci-overlayfs": "overlayfs"}
    path = tmp_path / "c.yaml"
    path.write_text("containerd:\n  snapshotters:\n    lazy: soci\n    plain: overlayfs\n  remote_snapshots: false\n")
    got = load_config(path).containerd
    assert got.snapshotters == {"lazy": "soci", "plain": "overlayfs"} and got.remote_snapshots is False


@pytest.mark.parametrize("text, words", [
    ("containerd: [soci]\n", "containerd must be a mapping"),
    ("containerd:\n  snapshotters: [soci]\n", "containerd.snapshotters must map names"),
    ("containerd:\n  snapshotters:\n    soci: zfs\n", "'zfs' is not one of overlayfs, soci"),
    ("containerd:\n  remote_snapshots: maybe\n", "remote_snapshots must be true or false"),
    ("containerd:\n  address: /run/x.sock\n", "unknown containerd setting 'address'"),
])
def test_bad_containerd_section_is_one_error_with_file_and_line(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:") and words in str(e.value)


def test_pull_into_an_unreachable_containerd_is_one_line(registry, tmp_path):
    layer = make_layer([Entry("hello.txt", data=b"hi\n")])
    push_image(registry.host, "ctrd/unreachable", [layer], image_config([layer]), tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("LAZYOCI_CONFIG", "LAZYOCI_ROOT")}
    p = subprocess.run([LAZYOCI, "--root", str(tmp_path / "root"), "containerd", "pull", "-q", "--address",
                        str(tmp_path / "no.sock"), f"{registry.host}/ctrd/unreachable:latest"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazyoci: error: containerd is not reachable"), p.stderr
