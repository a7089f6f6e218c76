"""The config file's parsed document kept in the data root: the same settings and errors as a fresh
parse, taken only for the very same text, and never trusted when it is not of the shape written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lazyoci.config import load_config
from lazyoci.config_documents import kept_document
from lazyoci.errors import ConfigError

EVERY_KEY = ("snapshotters:\n  - soci\n  - overlayfs\nruntime: crun\ninsecure_registries: [reg.local:5000]\n"
             "unpack_sync_fs: true\n"
             "registry_mirrors:\n  docker.io: [\"http://127.0.0.1:5001\", \"https://m.example\"]\n"
             "soci:\n  cache_dir: /var/cache/x\n  cache_max_bytes: 1073741824\n  fetch_timeout_seconds: 2.5\n"
             "  background_fetch: false\n  background_quiet_seconds: 30\n  background_interval_ms: 500\n"
             "  verify: true\n"
             "containerd:\n  snapshotters: {soci: soci, plain: overlayfs}\n")


def write(tmp_path: Path, text: str) -> tuple[Path, Path]:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    return config, tmp_path / "config-document.json"


def test_the_kept_document_gives_the_settings_a_fresh_parse_gives(tmp_path):
    config, kept = write(tmp_path, EVERY_KEY)
    fresh = load_config(config)
    assert not kept.exists()
    first = load_config(config, kept=kept)
    assert kept.exists() and kept.stat().st_mode & 0o077 == 0
    assert kept_document(kept, EVERY_KEY) is not None
    assert load_config(config, kept=kept) == first == fresh
    assert fresh.registry_mirrors["docker.io"] == ("http://127.0.0.1:5001", "https://m.example")


def test_a_command_with_a_kept_document_does_not_import_yaml(tmp_path):
    config, kept = write(tmp_path, EVERY_KEY)
    code = ("import sys; from pathlib import Path; from lazyoci.config import load_config; "
            f"c = load_config(Path({str(config)!r}), kept=Path({str(kept)!r})); "
            "print(c.runtime, 'yaml' in sys.modules)")
    run = [sys.executable, "-c", code]
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout.split() == ["crun", "True"]
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout.split() == ["crun", "False"]


def test_a_changed_file_is_parsed_again(tmp_path):
    config, kept = write(tmp_path, "runtime: runc\n")
    assert load_config(config, kept=kept).runtime == "runc"
    config.write_text("runtime: crun\n")
    assert load_config(config, kept=kept).runtime == "crun"
    config.write_text("runtime: runc \n")       # one byte more: not the kept text
    assert load_config(config, kept=kept).runtime == "runc"


@pytest.mark.parametrize("text, words", [
    ("runtime: runc\n\nbogus: 1\n", "config.yaml:3: unknown setting 'bogus'"),
    ("soci:\n  background_fetch: true\n  cache_max_bytes: -1\n", "config.yaml:3: soci.cache_max_bytes must not be"),
    ("snapshotters:\n  - soci\n  - zfs\n", "config.yaml:3: unknown snapshotter 'zfs'"),
    ("registry_mirrors:\n  5000: [x]\n", "config.yaml:2: mirrors of 5000 must be a list of URLs"),
])
def test_errors_from_the_kept_document_name_the_same_line(tmp_path, text, words):
    config, kept = write(tmp_path, text)
    messages = []
    for _ in range(2):
        with pytest.raises(ConfigError) as e:
            load_config(config, kept=kept)
        messages.append(str(e.value))
    assert kept.exists()
    assert messages[0] == messages[1] and words in messages[0], messages


def test_a_document_json_cannot_hold_is_not_kept(tmp_path):
    """A date (YAML makes a datetime.date of it) has no kept form: parsed every time, as before."""
    config, kept = write(tmp_path, "runtime: runc\nsoci:\n  cache_dir: 2001-01-01\n")
    for _ in range(2):
        with pytest.raises(ConfigError, match="soci.cache_dir has the wrong type"):
            load_config(config, kept=kept)
    assert not kept.exists()


@pytest.mark.parametrize("content", [
    b"", b"not json", b"[]", b'{"text": "runtime: crun\\n"}',
    b'{"text": "runtime: crun\\n", "document": {"dict": [["runtime"]]}}',
    b'{"text": "runtime: crun\\n", "document": {"dict": [[["a"], 1]]}}',
    b'{"text": "runtime: crun\\n", "document": {"list": []}}',
    b'{"text": "runtime: crun\\n", "document": ["runtime", "runc"]}',
    b'{"text": "runtime: crun\\n", "document": ' + b'[' * 5000 + b']' * 5000 + b'}',
])
def test_a_kept_document_not_of_the_shape_written_is_parsed_again(tmp_path, content):
    config, kept = write(tmp_path, "runtime: crun\n")
    kept.write_bytes(content)
    assert load_config(config, kept=kept).runtime == "crun"
    assert json.loads(kept.read_bytes())["text"] == "runtime: crun\n"     # and kept again


def test_a_kept_document_for_other_text_is_not_used(tmp_path):
    config, kept = write(tmp_path, "runtime: runc\n")
    kept.write_text(json.dumps({"text": "runtime: crun\n", "document": {"dict": [["runtime", "crun"]]}}))
    assert load_config(config, kept=kept).runtime == "runc"
