"""Span fetching through the real service, a real registry and a counting/faulting proxy."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers.fault_proxy import Fault, FaultProxy, spans_requested
from helpers.images import Entry, Layer, LAYER_GZIP, image_config, make_layer, push_image, sha, tar_bytes
from helpers.lazy import push_soci_index, running_service, store_ztoc, write_config, ztoc_for
from helpers.tricky_image import layer1_entries
from lazyoci.fs.background import BACKGROUND_RUN
from lazyoci.ztoc import Ztoc

pytestmark = pytest.mark.needs_root("FUSE mounts")

BIG_FILE = 190 << 20


def _pigz_layer(entries: list[Entry]) -> Layer:
    """A gzip layer compressed by pigz (fast on big random data; an independent compressor)."""
    raw = tar_bytes(entries)
    blob = subprocess.run(["pigz", "-1", "-n", "-c"], input=raw, capture_output=True, check=True).stdout
    return Layer(blob, sha(raw), LAYER_GZIP)


@pytest.fixture(scope="module")
def big(registry, tmp_path_factory):
    """A runnable image: a busybox base layer (below min size: no zTOC) and a 200 MiB indexed
    layer (small files, a 190 MiB random file, a needle at the end); its SOCI index is pushed."""
    work = tmp_path_factory.mktemp("big")
    entries = [Entry("etc/", kind="dir")]
    entries += [Entry(f"etc/small{i}.conf", data=f"small file {i}\n".encode() * 20) for i in range(50)]
    entries.append(Entry("data/big.bin", data=os.urandom(BIG_FILE)))
    entries.append(Entry("data/needle.txt", data=b"the needle\n"))
    layer = _pigz_layer(entries)
    base = make_layer(layer1_entries(), "gzip")
    push_image(registry.host, "lazy/big", [base, layer], image_config([base, layer]), work)
    push_soci_index(registry.host, "lazy/big", work, span_size=1 << 22, min_layer_size=10 << 20)
    ztoc = ztoc_for(layer)
    return layer, ztoc, base


def _blob_gets(proxy: FaultProxy, layer: Layer) -> list:
    return [r for r in proxy.log if r.method == "GET" and layer.digest in r.path]



def test_small_read_fetches_little_concurrent_readers_share_spans_and_restart_reuses_cache(
        registry, big, data_root, tmp_path):
    layer, ztoc_bytes, _base = big
    ztoc = Ztoc.parse(ztoc_bytes)
    zdigest = store_ztoc(data_root, ztoc_bytes)
    config = write_config(tmp_path / "c.yaml")
    with FaultProxy(registry.host) as proxy:
        ref = f"{proxy.host}/lazy/big:latest"
        with running_service(data_root, config) as client:
            d = client.mount_layer(ref, layer.digest, zdigest)
            assert (d / "data/needle.txt").read_bytes() == b"the needle\n"
            served = proxy.bytes_served
            assert served < len(layer.blob) * 0.10, f"{served} of {len(layer.blob)} bytes served"
            assert len(_blob_gets(proxy, layer)) >= 1

            # two readers of the same 24 MiB at once: every span fetched exactly once
            proxy.reset_counters()
            results: list[bytes] = []

            def reader() -> None:
                with open(d / "data/big.bin", "rb") as f:
                    f.seek(64 << 20)
                    results.append(f.read(24 << 20))

            threads = [threading.Thread(target=reader) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(results) == 2 and results[0] == results[1] and len(results[0]) == 24 << 20
            spans = spans_requested(ztoc, _blob_gets(proxy, layer))
            assert spans and len(spans) == len(set(spans)), f"spans fetched twice: {sorted(spans)}"
            st = client.status()["layers"][0]
            assert 0 < st["fetched_bytes"] < st["total_bytes"]

        # a restarted service mounts the layer again and serves cached spans without the registry
        proxy.reset_counters()
        with running_service(data_root, config) as client:
            d = client.paths.view_dir(layer.digest, zdigest)
            assert (d / "data/needle.txt").read_bytes() == b"the needle\n"
            with open(d / "data/big.bin", "rb") as f:
                f.seek(64 << 20)
                assert f.read(24 << 20) == results[0]
            assert _blob_gets(proxy, layer) == []


def test_container_reading_one_small_file_pulls_under_ten_percent(registry, big, data_root, tmp_path):
    """The headline: `run --snapshotter soci` of an indexed 200 MiB image reads one small file."""
    layer, _ztoc, base = big
    from lazyoci.config import load_config
    from lazyoci.images.service import ImageService
    from lazyoci.service.client import ServiceClient
    from lazyoci.snapshot.soci import SociSnapshotter
    from lazyoci.store.layout import DataRoot

    config = write_config(tmp_path / "c.yaml")
    root = DataRoot(data_root)
    with FaultProxy(registry.host) as proxy:
        ref = f"{proxy.host}/lazy/big:latest"
        images = ImageService(root)
        try:
            SociSnapshotter(root, load_config(config), client=images.client).pull(images, ref)
        finally:
            images.close()
        r = subprocess.run([str(Path(sys.executable).parent / "lazyoci"), "--root", str(data_root),
                            "--config", str(config), "run", "--rm", "--snapshotter", "soci", ref,
                            "cat", "/data/needle.txt"], capture_output=True, text=True, timeout=120)
        ServiceClient(root, config).stop()
        assert r.returncode == 0, r.stderr
        assert r.stdout == "the needle\n"
        total = len(layer.blob) + len(base.blob)
        served = proxy.bytes_served
        assert served < total * 0.10, f"the registry served {served} of the image's {total} bytes"


def _small_image(registry, tmp_path, repo: str) -> tuple[Layer, bytes]:
    entries = [Entry(f"f{i}.bin", data=os.urandom(200 << 10)) for i in range(6)]
    layer = make_layer(entries, "gzip")
    push_image(registry.host, repo, [layer], image_config([layer]), tmp_path)
    return layer, ztoc_for(layer, span_size=64 << 10)


def test_corrupt_blob_in_registry_gives_eio_never_wrong_data(fresh_registry, data_root, tmp_path):
    layer, ztoc_bytes = _small_image(fresh_registry, tmp_path, "lazy/corrupt")
    ztoc = Ztoc.parse(ztoc_bytes)
    zdigest = store_ztoc(data_root, ztoc_bytes)
    # flip one byte inside the span that holds the middle of f4.bin
    target = next(ztoc.entry(i) for i in range(len(ztoc)) if ztoc.entry(i).name.endswith("f4.bin"))
    span = ztoc.spans_for(target.offset + 100_000, target.offset + 100_001)[0]
    lo, hi = ztoc.span_compressed_range(span)
    blob_path = fresh_registry.blob_path(layer.digest)
    data = bytearray(blob_path.read_bytes())
    data[(lo + hi) // 2] ^= 0xFF
    blob_path.write_bytes(bytes(data))
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        d = client.mount_layer(f"{fresh_registry.host}/lazy/corrupt:latest", layer.digest, zdigest)
        with pytest.raises(OSError) as exc:
            (d / "f4.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        # spans that are intact still read fine
        assert len((d / "f0.bin").read_bytes()) == 200 << 10
        log = client.paths.log_file.read_text()
        assert "does not match its digest" in log
    # a full pull of the same image fails on the digest too
    from lazyoci.errors import IntegrityError
    from lazyoci.images.service import ImageService
    from lazyoci.store.layout import DataRoot

    images = ImageService(DataRoot(tmp_path / "other-root"))
    try:
        with pytest.raises(IntegrityError):
            images.pull(f"{fresh_registry.host}/lazy/corrupt:latest")
    finally:
        images.close()


def test_reset_mid_span_is_retried_and_200_to_range_is_a_clear_error(registry, data_root, tmp_path):
    layer, ztoc_bytes = _small_image(registry, tmp_path, "lazy/faults")
    zdigest = store_ztoc(data_root, ztoc_bytes)
    with FaultProxy(registry.host) as proxy, \
            running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        d = client.mount_layer(f"{proxy.host}/lazy/faults:latest", layer.digest, zdigest)
        reset = proxy.add(Fault("reset", match=layer.digest, method="GET", times=1))
        assert len((d / "f1.bin").read_bytes()) == 200 << 10
        assert reset.applied == 1
        proxy.add(Fault("ignore_range", match=layer.digest, times=None))
        with pytest.raises(OSError) as exc:
            (d / "f5.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        assert "Range" in client.paths.log_file.read_text()


def test_background_fetcher_completes_a_layer_without_reads(registry, data_root, tmp_path):
    layer, ztoc_bytes = _small_image(registry, tmp_path, "lazy/background")
    zdigest = store_ztoc(data_root, ztoc_bytes)
    config = write_config(tmp_path / "c.yaml", background=True, quiet=0.2, interval_ms=5)
    with running_service(data_root, config) as client:
        client.mount_layer(f"{registry.host}/lazy/background:latest", layer.digest, zdigest)
        deadline = time.monotonic() + 30
        while True:
            st = client.status()["layers"][0]
            if st["fetched_bytes"] == st["total_bytes"]:
                break
            assert time.monotonic() < deadline, f"background fetch stalled: {st}"
            time.sleep(0.1)
        assert st["percent"] == 100.0


def test_spans_from_an_authenticated_registry_use_docker_credentials(data_root, tmp_path, monkeypatch):
    """The service makes its own registry client: Basic auth from the docker config it inherits."""
    import base64
    import json

    from helpers.images import write_oci_layout
    from helpers.registry import start_registry

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(subprocess.run(["htpasswd", "-Bbn", "alice", "s3cret"], check=True,
                                        capture_output=True).stdout)
    reg = start_registry(tmp_path / "authreg", htpasswd=htpasswd)
    try:
        layer = make_layer([Entry("secret.txt", data=b"behind a login\n")])
        layout = tmp_path / "layout"
        write_oci_layout(layout, [layer], image_config([layer]))
        subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                        "--dest-creds", "alice:s3cret", f"oci:{layout}:latest",
                        f"docker://{reg.host}/lazy/auth:latest"], check=True, capture_output=True)
        zdigest = store_ztoc(data_root, ztoc_for(layer, span_size=64 << 10))
        docker = tmp_path / "docker"
        docker.mkdir()
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))
        (docker / "config.json").write_text(json.dumps(
            {"auths": {reg.host: {"auth": base64.b64encode(b"alice:wrong").decode()}}}))
        with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
            d = client.mount_layer(f"{reg.host}/lazy/auth:latest", layer.digest, zdigest)
            with pytest.raises(OSError) as exc:        # wrong password: EIO, the registry's refusal logged
                (d / "secret.txt").read_bytes()
            assert exc.value.errno == errno.EIO
            assert "authentication required" in client.paths.log_file.read_text()
        (docker / "config.json").write_text(json.dumps(
            {"auths": {reg.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
        with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:  # credentials read at start
            d = client.paths.view_dir(layer.digest, zdigest)
            assert (d / "secret.txt").read_bytes() == b"behind a login\n"
    finally:
        reg.stop()


def test_reading_one_file_fetches_no_span_it_never_reads_and_status_says_so(registry, data_root, tmp_path):
    layer, ztoc_bytes = _small_image(registry, tmp_path, "lazy/unread")
    ztoc = Ztoc.parse(ztoc_bytes)
    zdigest = store_ztoc(data_root, ztoc_bytes)
    i2 = next(i for i in range(len(ztoc)) if ztoc.entry(i).name.endswith("f2.bin"))
    f2, before = ztoc.entry(i2), ztoc.entry(i2 - 1)
    with FaultProxy(registry.host) as proxy:
        with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
            d = client.mount_layer(f"{proxy.host}/lazy/unread:latest", layer.digest, zdigest)
            assert len((d / "f2.bin").read_bytes()) == 200 << 10
            spans = spans_requested(ztoc, _blob_gets(proxy, layer))
            # its header and data, and the header of the entry before it (where its header starts)
            wanted = set(ztoc.spans_for(f2.offset - 512, f2.offset + f2.size)) | \
                set(ztoc.spans_for(before.offset - 512, before.offset))
            assert set(spans) <= wanted, f"spans {sorted(set(spans) - wanted)} lie outside f2.bin"
            st = client.status()["layers"][0]
            assert st["fetched_spans"] == len(set(spans)) and st["unread_spans"] == 0
            assert st["unread_bytes"] == 0 and st["read_bytes"] >= f2.size
            assert st["network_bytes"] == sum(r.bytes_sent for r in _blob_gets(proxy, layer))


def test_background_fetch_moves_each_span_once_and_counts_it_unread(registry, data_root, tmp_path):
    layer, ztoc_bytes = _small_image(registry, tmp_path, "lazy/background-once")
    ztoc = Ztoc.parse(ztoc_bytes)
    zdigest = store_ztoc(data_root, ztoc_bytes)
    config = write_config(tmp_path / "c.yaml", background=True, quiet=0.2, interval_ms=5)
    with FaultProxy(registry.host) as proxy:
        with running_service(data_root, config) as client:
            client.mount_layer(f"{proxy.host}/lazy/background-once:latest", layer.digest, zdigest)
            deadline = time.monotonic() + 30
            while client.status()["layers"][0]["percent"] < 100.0:
                assert time.monotonic() < deadline, "background fetch stalled"
                time.sleep(0.1)
            spans = spans_requested(ztoc, _blob_gets(proxy, layer))
            assert sorted(spans) == list(range(ztoc.num_spans)), "each span exactly once"
            gets = len(_blob_gets(proxy, layer))
            assert ztoc.num_spans > BACKGROUND_RUN and gets <= -(-ztoc.num_spans // BACKGROUND_RUN), \
                f"{gets} requests for {ztoc.num_spans} spans: adjacent spans go in one request"
            moved = sum(r.bytes_sent for r in _blob_gets(proxy, layer))
            assert moved <= len(layer.blob) * 1.02, f"{moved} bytes moved for a {len(layer.blob)} byte layer"
            st = client.status()["layers"][0]
            assert st["fetched_spans"] == st["unread_spans"] == ztoc.num_spans
