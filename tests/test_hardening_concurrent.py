"""20 lazy containers of one image at once (runc, the soci snapshotter): every container reads
every regular file of the image right (its sha256 equals the tar's), and each span of each lazy
layer is fetched from the registry once (the proxy counts the Range requests)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.fault_proxy import FaultProxy, spans_requested
from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import push_soci_index, write_config, ztoc_for
from helpers.tricky_image import layer1_entries
from lazyoci.ztoc import Ztoc

pytestmark = pytest.mark.needs_root("FUSE, overlay and runc")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
CONTAINERS = 20


def _expected(entries: list[Entry]) -> dict[str, str]:
    """sha256 of every regular file (hard links: their target's content), by absolute path."""
    data = {e.name: e.data for e in entries if e.kind == "file"}
    out = {f"/{e.name}": hashlib.sha256(data[e.name]).hexdigest() for e in entries if e.kind == "file"}
    out.update({f"/{e.name}": hashlib.sha256(data[e.linkname]).hexdigest()
                for e in entries if e.kind == "hardlink"})
    return out


def _lz(root: Path, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), *args],
                       capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"lazyoci {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


def test_twenty_lazy_containers_read_everything_right_with_each_span_fetched_once(
        registry, data_root, tmp_path):
    base_entries = layer1_entries()
    top_entries = [Entry("data/", kind="dir")] + [Entry(f"data/f{i}.bin", data=os.urandom(256 << 10))
                                                    for i in range(8)]
    base, top = make_layer(base_entries), make_layer(top_entries)
    push_image(registry.host, "hardening/twenty", [base, top], image_config([base, top]), tmp_path)
    push_soci_index(registry.host, "hardening/twenty", tmp_path, span_size=64 << 10)
    expected = _expected(base_entries) | _expected(top_entries)
    for written_by_run in ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf"):   # bind mounts of run
        expected.pop(written_by_run, None)
    config = write_config(tmp_path / "c.yaml", extra="snapshotters:\n  - soci\n")
    with FaultProxy(registry.host) as proxy:
        ref = f"{proxy.host}/hardening/twenty:latest"
        try:
            _lz(data_root, config, "pull", "--snapshotter", "soci", ref)
            # a lazy pull downloads no layer (the mount may fetch a layer's first span: a Range request)
            assert not [r.path for r in proxy.log if r.range is None and
                        (base.digest in r.path or top.digest in r.path)]
            cmd = ["run", "--rm", ref, "sha256sum", *sorted(expected)]
            procs = [subprocess.Popen([LAZYOCI, "--root", str(data_root), "--config", str(config), *cmd],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(CONTAINERS)]
            results = [p.communicate(timeout=600) for p in procs]
            for p, (out, err) in zip(procs, results):
                assert p.returncode == 0, err
                got = {path: digest for digest, path in (line.split() for line in out.splitlines())}
                assert got == expected
            for layer in (base, top):
                ztoc = Ztoc.parse(ztoc_for(layer, span_size=64 << 10))
                spans = spans_requested(ztoc, [r for r in proxy.log if r.method == "GET" and layer.digest in r.path])
                assert spans, f"no span of {layer.digest} was fetched"
                assert len(spans) == len(set(spans)), f"spans fetched twice: {sorted(spans)}"
        finally:
            for c in _lz(data_root, config, "ps", "-a", "-q", check=False).stdout.split():
                _lz(data_root, config, "rm", "-f", c, check=False)
            _lz(data_root, config, "service", "stop", check=False)

