"""The config file, --config and --root through the real `lazyoci` executable: every bad input is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazyoci.config import SociConfig, load_config
from lazyoci.errors import ConfigError

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def lazyoci(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("LAZYOCI_CONFIG", "LAZYOCI_ROOT")}
    return subprocess.run([LAZYOCI, *args], capture_output=True, text=True, env={**environ, **(env or {})},
                          timeout=60)


def one_line_error(p: subprocess.CompletedProcess, *patterns: str) -> str:
    assert p.returncode != 0, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("lazyoci: error:"), lines[0]
    for pattern in patterns:
        assert pattern in lines[0], lines[0]
    return lines[0]


def with_config(tmp_path: Path, text: str | bytes) -> subprocess.CompletedProcess:
    config = tmp_path / "config.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    return lazyoci("--root", str(tmp_path / "root"), "--config", str(config), "images")


def test_every_documented_key_is_accepted(tmp_path):
    """The README's and the module's example configs load, so the checks below reject only what is wrong."""
    config = tmp_path / "config.yaml"
    config.write_text("snapshotters:\n  - soci\nruntime: runc\ninsecure_registries: []\nunpack_sync_fs: true\n"
                      "registry_mirrors:\n  docker.io: [\"http://127.0.0.1:5001\"]\n"
                      "soci:\n  cache_dir: /var/lib/lazyoci/soci/cache\n  cache_max_bytes: 0\n"
                      "  background_fetch: true\n  background_quiet_seconds: 30\n"
                      "  background_interval_ms: 500\n")
    cfg = load_config(config)
    assert cfg.snapshotters == ("soci",) and cfg.registry_mirrors == {"docker.io": ("http://127.0.0.1:5001",)}
    assert cfg.unpack_sync_fs is True
    assert cfg.soci.background_quiet_seconds == 30 and cfg.soci.cache_dir == Path("/var/lib/lazyoci/soci/cache")
    empty = tmp_path / "empty.yaml"
    empty.write_text("soci:\nregistry_mirrors:\n")        # keys without values mean the defaults
    assert load_config(empty).soci == SociConfig() and load_config(empty).unpack_sync_fs is False


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    one_line_error(with_config(tmp_path, b"runtime: runc\n# caf\xe9\n"), "config.yaml", "not UTF-8")


def test_yaml_syntax_errors_are_one_line_with_the_file_and_line(tmp_path):
    line = one_line_error(with_config(tmp_path, "runtime: runc\nsoci:\n  verify: [true\n"), "config.yaml:")
    assert "invalid YAML" in line
    one_line_error(with_config(tmp_path, "runtime: runc\n\nsnapshotters: a: b\n"), "config.yaml:3:")


@pytest.mark.parametrize("text, line, words", [
    ("[a]: 1\n", 1, "a key must be a plain value"),
    ("registry_mirrors: {[a]: [b]}\n", 1, "a key must be a plain value"),
    ("soci:\n  {x: 1}: 2\n", 2, "a key must be a plain value"),
    ("runtime: runc\nruntime: crun\n", 2, "duplicate key 'runtime'"),
    ("soci:\n  background_fetch: true\n  background_fetch: false\n", 3, "duplicate key 'background_fetch'"),
])
def test_keys_that_are_not_plain_or_repeated_are_one_line(tmp_path, text, line, words):
    """Unhashable keys crashed the loader (TypeError); a repeated key silently kept the last value."""
    one_line_error(with_config(tmp_path, text), f"config.yaml:{line}:", words)


def test_an_explicit_config_file_must_exist(tmp_path):
    missing = tmp_path / "missing.yaml"
    one_line_error(lazyoci("--root", str(tmp_path / "root"), "--config", str(missing), "images"),
                   str(missing), "no such config file")
    one_line_error(lazyoci("--root", str(tmp_path / "root"), "images", env={"LAZYOCI_CONFIG": str(missing)}),
                   str(missing), "no such config file")
    # the default file may be missing: its defaults apply
    p = lazyoci("--root", str(tmp_path / "root"), "images", env={"HOME": str(tmp_path / "home")})
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("text, line, words", [
    ("runtime: runc\nsnapshoters:\n  - soci\n", 2, "unknown setting 'snapshoters'"),
    ("soci:\n  cache_max_bytes: 1\n  backgroud_fetch: false\n", 3, "unknown soci setting 'backgroud_fetch'"),
])
def test_unknown_keys_are_errors_naming_the_key_and_the_file(tmp_path, text, line, words):
    one_line_error(with_config(tmp_path, text), f"config.yaml:{line}:", words)


@pytest.mark.parametrize("text, line, words", [
    ("registry_mirrors:\n  docker.io: \"http://127.0.0.1:5001\"\n", 2, "mirrors of 'docker.io' must be a list"),
    ("registry_mirrors: [\"http://127.0.0.1:5001\"]\n", 1, "registry_mirrors must map"),
    ("snapshotters: soci\n", 1, "snapshotters must be a list"),
    ("insecure_registries: myreg:5000\n", 1, "insecure_registries must be a list"),
    ("runtime: [runc]\n", 1, "unknown runtime"),
    ("unpack_sync_fs: \"yes\"\n", 1, "unpack_sync_fs must be true or false"),
    ("soci: on\n", 1, "soci must be a mapping"),
    ("soci:\n  background_fetch: \"no\"\n", 2, "soci.background_fetch has the wrong type"),
    ("soci:\n  background_quiet_seconds: true\n", 2, "soci.background_quiet_seconds has the wrong type"),
    ("soci:\n  cache_max_bytes: \"10G\"\n", 2, "soci.cache_max_bytes has the wrong type"),
])
def test_values_of_the_wrong_type_are_errors(tmp_path, text, line, words):
    one_line_error(with_config(tmp_path, text), f"config.yaml:{line}:", words)


def test_load_config_raises_config_error(tmp_path):
    """The library gives the same errors to its own callers (the service reads the file too)."""
    config = tmp_path / "c.yaml"
    config.write_text("registry_mirrors:\n  docker.io: \"http://x\"\n")
    with pytest.raises(ConfigError, match="must be a list of URLs"):
        load_config(config)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("root, message", [
    ("/etc/passwd", "data root /etc/passwd is not a directory"),
    ("/proc/nope", "cannot create data root /proc/nope"),
    ("/etc/passwd/sub", "cannot create data root /etc/passwd/sub"),
])
def test_a_data_root_that_cannot_be_a_directory_is_one_line(root, message):
    one_line_error(lazyoci("--root", root, "images"), message)
    one_line_error(lazyoci("images", env={"LAZYOCI_ROOT": root}), message)
