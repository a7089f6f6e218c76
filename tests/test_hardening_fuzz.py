"""Coverage-guided fuzzing (atheris) of every parser of untrusted bytes, for a bounded time.

Each target runs in its own process (libFuzzer exits when done) from a seed corpus made of
real objects (tests/fuzz/seeds.py). The property: any input parses or raises a LazyociError,
never another exception, a hang (-timeout) or unbounded memory (-rss_limit_mb).
In `make test` each run is fixed (a seed and a number of inputs), so that it finds the same
things on every machine and a finding is a failure every time, never a flaky one.
`make fuzz` runs the same targets for a time (LAZYOCI_FUZZ_SECONDS) from a random seed and keeps
the corpus (LAZYOCI_FUZZ_CORPUS) so that coverage grows from run to run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import targets  # noqa: E402
from seeds import write_corpus  # noqa: E402

needs_atheris = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                   reason="atheris is not installed (pip install -e '.[test]')")

RUNNER = Path(__file__).parent / "fuzz" / "run.py"
TARGETS = ["tar_stream", "toc_builder", "ztoc", "zinfo", "soci_index", "manifest", "reference", "config_file",
           "zstd_chunked_toc", "estargz"]
SECONDS = int(os.environ.get("LAZYOCI_FUZZ_SECONDS", "0"))     # 0: the fixed run of make test
FIXED_RUN = ["-seed=1", "-runs=8000"]                           # about 3 s a target


_D = "sha256:" + "a" * 64


def _manifest(**fields: object) -> bytes:
    obj = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _D, "size": 2},
           "layers": []}
    return json.dumps({**obj, **fields}).encode()


# What the fuzzer found, kept as regressions: (target, input). The first byte of a "manifest"
# input picks the parser (targets.manifest): 1 manifest, 2 index, 3 image config.
FINDINGS = {
    "manifest-media-type-not-a-string": ("soci_index", b'{"schemaVersion":2,"mediaType":{"mediaType":"a"}}'),
    "annotations-a-list": ("manifest", b"\x01" + _manifest(annotations=["a"])),
    "descriptor-digest-a-number": ("manifest", b"\x01" + _manifest(layers=[{"mediaType": "x", "digest": 5, "size": 1}])),
    "descriptor-size-a-bool": ("manifest", b"\x01" + _manifest(layers=[{"mediaType": "x", "digest": _D, "size": True}])),
    "config-rootfs-a-list": ("manifest", b"\x03" + json.dumps({"rootfs": ["x"]}).encode()),
    "config-cmd-a-string": ("manifest", b"\x03" + json.dumps({"config": {"Cmd": "echo hi"}}).encode()),
    "platform-fields-not-strings": ("manifest", b"\x02" + json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _D, "size": 1,
                       "platform": {"os": 1, "architecture": []}}]}).encode()),
    "config-file-not-utf8": ("config_file", b"soci:\n  \x91\x9c: 1\n"),
    "config-file-key-a-mapping": ("config_file", b"{{}}"),
    "zstd-chunked-version-a-list": ("zstd_chunked_toc", b'\x01{"version":[{"type":"dir","name":"etc/"}]}'),
}


def test_the_estargz_seeds_parse():
    """The eStargz seeds are valid tails (the fuzzer starts from inputs that parse)."""
    from seeds import estargz_tail

    from lazyoci.estargz import EStargzIndex

    for legacy in (False, True):
        index = EStargzIndex.parse(estargz_tail(legacy))
        assert [index.entry(i).name for i in range(len(index))][:3] == [".prefetch.landmark", "etc", "etc/a"]
        assert index.prefetch_bytes == 0 and index.num_spans == 4     # landmark, 2 chunk members, the TOC


@pytest.mark.parametrize("name", ["etc/\ud800x", "etc/\udc80x", "etc/\ufffd"])
def test_an_estargz_name_that_was_not_utf8_is_refused(name):
    """Found by hand after the fuzzer: a lone surrogate in a TOC name crashed the encoder. A TOC
    (JSON) cannot carry a tar name that is not UTF-8, its writer puts U+FFFD there: refused."""
    from seeds import estargz_tail

    from lazyoci.errors import FormatError
    from lazyoci.estargz import EStargzIndex

    with pytest.raises(FormatError, match="not UTF-8"):
        EStargzIndex.parse(estargz_tail(name=name))


@pytest.mark.parametrize("finding", list(FINDINGS))
def test_fuzz_finding_is_refused_with_a_lazyoci_error(finding, tmp_path, monkeypatch):
    """Parsed strictly: the wrong JSON type (or bytes) is a LazyociError, never another exception
    and never a silently reinterpreted value."""
    from lazyoci.errors import LazyociError

    monkeypatch.chdir(tmp_path)          # where the config target writes its file

    target, data = FINDINGS[finding]
    with pytest.raises(LazyociError):
        targets.TARGETS[target](data)



@pytest.mark.slow
@needs_atheris
@pytest.mark.parametrize("target", TARGETS)
def test_parser_survives_fuzzing(target, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keep = os.environ.get("LAZYOCI_FUZZ_CORPUS")
    corpus = write_corpus(target, Path(keep) / target if keep else tmp_path / "corpus")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    r = subprocess.run(
        [sys.executable, str(RUNNER), target, str(corpus),
         *([f"-max_total_time={SECONDS}"] if SECONDS else FIXED_RUN),
         "-timeout=10", "-rss_limit_mb=1024", "-max_len=65536", f"-artifact_prefix={artifacts}/",
         "-print_final_stats=1"],
        capture_output=True, text=True, timeout=(SECONDS or 60) + 120, cwd=tmp_path)
    crashes = sorted(artifacts.iterdir())
    detail = r.stderr[-6000:]
    for crash in crashes[:1]:
        detail += f"\nreproducer {crash.name}: {crash.read_bytes()[:400]!r}"
    assert r.returncode == 0 and not crashes, f"{target}: the fuzzer found a crash\n{detail}"
    assert "stat::number_of_executed_units" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
@needs_atheris
def test_the_memory_limit_counts_from_the_fuzzer_not_from_the_process_that_started_it(tmp_path):
    """Linux carries a process's peak RSS over exec: a runner started by a process that once held
    more than the limit must still fuzz (a test run that grew past a gigabyte stopped the fuzzer at
    its first input, and the test failed for memory the parser never used)."""
    corpus = write_corpus("reference", tmp_path / "corpus")
    big_then_exec = (
        "import os, sys\n"
        "b = bytearray(600 << 20)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")
    r = subprocess.run(
        [sys.executable, "-c", big_then_exec, str(RUNNER), "reference", str(corpus),
         "-seed=1", "-max_total_time=3", "-rss_limit_mb=512",     # the limit is checked once a second f"-artifact_prefix={tmp_path}/",
         "-print_final_stats=1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stat::number_of_executed_units" in r.stderr, r.stderr[-2000:]
