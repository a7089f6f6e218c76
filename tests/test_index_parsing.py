"""zTOCs parsed in the service's helper process give a mount what its own parse gives, and a helper
that fails or refuses a zTOC only sends the parse back to the service (service/index_parsing.py)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import tarfile
from pathlib import Path

import pytest

from helpers.tricky_image import tricky_layers
from lazyoci.errors import FormatError
from lazyoci.fs.tree import LayerTree
from lazyoci.service import index_parsing
from lazyoci.service.index_parsing import IndexParser
from lazyoci.ztoc import Ztoc, build_ztoc


def _stored(tmp_path: Path, data: bytes) -> tuple[str, str]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp_path / digest[7:]
    path.write_bytes(data)
    return str(path), digest


@pytest.fixture
def parser(monkeypatch):
    monkeypatch.setattr(index_parsing, "HELPER_MIN_BYTES", 0)     # the tests' small zTOCs go to it too
    p = IndexParser()
    p.start()
    assert p.ready(60), "the helper did not start"
    yield p
    p.close()
    assert _helper_pids() == []


def _helper_pids() -> list[int]:
    """This process's helpers (its children running the helper module)."""
    return [p for p in _children_of(os.getpid()) if _is_helper(p)]


def test_the_helpers_parse_is_the_services_own(parser, tmp_path):
    for layer in tricky_layers():
        data = build_ztoc(io.BytesIO(layer.blob), "gzip" if layer.media_type.endswith("gzip") else "none", 64 << 10)
        path, digest = _stored(tmp_path, data)
        got = parser.parse(path, digest, data)
        assert got is not None
        ztoc, tree = got.ztoc, got.tree()
        assert tree is not None
        own = Ztoc.parse(data, digest=digest)
        own_tree = LayerTree(own)
        assert ztoc.digest == digest and len(ztoc) == len(own) and ztoc.num_spans == own.num_spans
        assert [ztoc.entry(i) for i in range(len(ztoc))] == [own.entry(i) for i in range(len(own))]
        assert [ztoc.entry_extent(i) for i in range(len(ztoc))] == [own.entry_extent(i) for i in range(len(own))]
        assert tree.columns() == own_tree.columns()
        assert list(tree.walk()) == list(own_tree.walk())


def test_what_the_helpers_build_logs_is_in_the_services_log(parser, tmp_path, caplog):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        f = tarfile.TarInfo("file")
        f.size = 3
        tar.addfile(f, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("dangling")
        link.type, link.linkname = tarfile.LNKTYPE, "nowhere"
        tar.addfile(link)
    data = build_ztoc(io.BytesIO(buf.getvalue()), "none", 64 << 10)
    path, digest = _stored(tmp_path, data)
    with caplog.at_level(logging.WARNING):
        got = parser.parse(path, digest, data)
        assert got is not None and got.tree() is not None
    assert any("has no target in the layer" in r.getMessage() for r in caplog.records)


def test_the_helper_takes_the_next_ztoc_once_its_tree_is_taken(parser, tmp_path):
    """The first answer comes before the tree; the helper is busy until the tree's answer is read
    (by a thread of the parser's own, whatever the caller does), and free again after it."""
    data = build_ztoc(io.BytesIO(tricky_layers()[0].blob), "gzip", 64 << 10)
    path, digest = _stored(tmp_path, data)
    first = parser.parse(path, digest, data)
    assert first is not None
    second = parser.parse(path, digest, data)         # busy or free again: never a mixed-up reply
    tree = first.tree()
    assert tree is not None and tree.columns() == LayerTree(Ztoc.parse(data, digest=digest)).columns()
    if second is not None:
        assert second.tree() is not None
    again = parser.parse(path, digest, data)
    assert again is not None and again.tree() is not None     # the tree taken: free for the next


def test_a_tree_that_follows_its_ztoc_at_once_is_taken(parser, tmp_path, monkeypatch):
    """A small layer's tree reply comes right behind the zTOC's: read into a buffer with the first,
    it would be hidden from the wait for the second until that timed out (a pull's 60 s)."""
    monkeypatch.setattr(index_parsing, "HELPER_SECONDS", 5.0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        f = tarfile.TarInfo("file")
        f.size = 3
        tar.addfile(f, io.BytesIO(b"abc"))
    data = build_ztoc(io.BytesIO(buf.getvalue()), "none", 64 << 10)
    path, digest = _stored(tmp_path, data)
    for _ in range(10):
        got = parser.parse(path, digest, data)
        assert got is not None and got.tree() is not None


def test_a_ztoc_the_helper_refuses_is_the_services_to_refuse(parser, tmp_path):
    good = build_ztoc(io.BytesIO(tricky_layers()[0].blob), "gzip", 64 << 10)
    bad = good[: len(good) // 2]
    path, digest = _stored(tmp_path, bad)
    assert parser.parse(path, digest, bad) is None
    with pytest.raises(FormatError):
        Ztoc.parse(bad, digest=digest)
    path, digest = _stored(tmp_path, good)            # the helper goes on serving
    assert parser.parse(path, digest, good) is not None


def test_bytes_that_differ_from_the_digest_are_not_taken(parser, tmp_path):
    """The helper checks what it reads against the digest: a blob that changed under the mount
    is parsed by the service from the bytes it checked itself."""
    good = build_ztoc(io.BytesIO(tricky_layers()[0].blob), "gzip", 64 << 10)
    path, digest = _stored(tmp_path, good)
    Path(path).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert parser.parse(path, digest, good) is None


def test_a_helper_that_dies_is_replaced(parser, tmp_path):
    data = build_ztoc(io.BytesIO(tricky_layers()[0].blob), "gzip", 64 << 10)
    path, digest = _stored(tmp_path, data)
    assert parser.parse(path, digest, data) is not None
    helpers = _helper_pids()
    assert helpers
    for pid in helpers:
        os.kill(pid, signal.SIGKILL)
    assert parser.parse(path, digest, data) is None          # parsed by the service meanwhile
    assert parser.ready(60)
    assert parser.parse(path, digest, data) is not None
    assert not set(_helper_pids()) & set(helpers)


def test_a_small_ztoc_or_a_helper_not_started_yet_leaves_the_parse_to_the_service(tmp_path, monkeypatch):
    data = build_ztoc(io.BytesIO(tricky_layers()[0].blob), "gzip", 64 << 10)
    path, digest = _stored(tmp_path, data)
    p = IndexParser()
    try:
        assert p.parse(path, digest, data) is None       # not started
        p.start()
        assert p.ready(60)
        monkeypatch.setattr(index_parsing, "HELPER_MIN_BYTES", len(data) + 1)
        assert p.parse(path, digest, data) is None       # under HELPER_MIN_BYTES
        monkeypatch.setattr(index_parsing, "HELPER_MIN_BYTES", 0)
        assert p.parse(path, digest, data) is not None
    finally:
        p.close()
    assert p.parse(path, digest, data) is None           # closed
    assert _helper_pids() == []


@pytest.mark.needs_root("FUSE and overlay")
def test_the_service_mounts_through_its_helper_and_ends_it(registry, data_root, tmp_path):
    import subprocess
    import sys
    import time

    from helpers.lazy import push_soci_index, write_config
    from helpers.tricky_image import PASSWD, push_tricky_image

    lazyoci = str(Path(sys.executable).parent / "lazyoci")
    config = write_config(tmp_path / "config.yaml")

    def lz(*args: str) -> str:
        r = subprocess.run([lazyoci, "--root", str(data_root), "--config", str(config), *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    push_tricky_image(registry.host, "helper/tricky", tmp_path)
    push_soci_index(registry.host, "helper/tricky", tmp_path)      # 64 KiB spans: an 0.8 MB zTOC
    ref = f"{registry.host}/helper/tricky:latest"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lz("service", "start")
    try:
        service = int((data_root / "service/lazyoci.pid").read_text().split()[0])
        deadline = time.monotonic() + 60
        while not [p for p in _children_of(service) if _is_helper(p)]:
            assert time.monotonic() < deadline, "the service started no helper"
            time.sleep(0.05)
        lz("pull", "--snapshotter", "soci", ref)
        lz("image", "mount", "--snapshotter", "soci", ref, str(mnt))
        assert (mnt / "etc/passwd").read_bytes() == PASSWD
        lz("image", "unmount", str(mnt))
        log = (data_root / "service/lazyoci.log").read_text()
        assert "parsed by the helper" in log, log
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        subprocess.run([lazyoci, "--root", str(data_root), "--config", str(config), "service", "stop"],
                       capture_output=True, timeout=120)
    deadline = time.monotonic() + 10
    while any(_is_helper(int(p)) for p in os.listdir("/proc") if p.isdigit()):
        assert time.monotonic() < deadline, "the helper outlived its service"
        time.sleep(0.05)


def _children_of(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:      # a thread that ended meanwhile (the parser's tree readers)
            continue
    return out


def _is_helper(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"lazyoci.service.index_parsing" in f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
