"""READs answered by the FUSE session holder from the span cache, through the real service, holder,
kernel and registry: every READ of a complete, checked layer, and of a layer still being fetched
those of files and spans the service has read before; byte for byte, taken back before eviction
and handed over again after a restart."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import running_service, store_ztoc, write_config, ztoc_for
from lazyoci.fs.background import read_as_fetched
from lazyoci.fs.span_cache import SpanCache
from lazyoci.fs.span_fetcher import SpanFetcher
from lazyoci.errors import LazyociError
from lazyoci.service.holder_link import HolderPaths, holder_status
from lazyoci.ztoc import Ztoc

pytestmark = pytest.mark.needs_root("FUSE mounts")


def _files() -> dict[str, bytes]:
    return {"empty": b"", "small.txt": b"hello\n", "odd.bin": os.urandom(70_001),
            "big.bin": os.urandom(3 << 20), "dir/inner.bin": os.urandom(150_000)}


def _image(registry, tmp_path: Path, repo: str, files: dict[str, bytes]):
    entries = [Entry("dir/", kind="dir")] + [Entry(name, data=data) for name, data in files.items()]
    entries.append(Entry("link.bin", kind="hardlink", linkname="odd.bin"))
    layer = make_layer(entries, "gzip")
    push_image(registry.host, repo, [layer], image_config([layer]), tmp_path)
    return layer, ztoc_for(layer, span_size=64 << 10)


def _status(client) -> dict:
    return holder_status(HolderPaths(client.paths.dir)) or {}


def _wait(what: str, done, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _percent(client, layer_digest: str) -> float:
    return next(l["percent"] for l in client.status()["layers"] if l["layer_digest"] == layer_digest)


def _read_cold(path: Path) -> bytes:
    """The file's bytes with its page cache dropped first, so that every byte is a FUSE READ."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while chunk := os.read(fd, 1 << 20):
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def _service_reads(client) -> int:
    """READs the holder relayed to the service."""
    return _status(client)["opcodes"].get("15", [0, 0])[0]


def test_the_holder_answers_reads_of_a_complete_checked_layer_byte_for_byte(registry, data_root, tmp_path):
    files = _files()
    layer, ztoc_bytes = _image(registry, tmp_path, "holder/reads", files)
    zdigest = store_ztoc(data_root, ztoc_bytes)
    config = write_config(tmp_path / "c.yaml", background=True, quiet=0.2, interval_ms=5)
    with running_service(data_root, config) as client:
        d = client.mount_layer(f"{registry.host}/holder/reads:latest", layer.digest, zdigest)
        _wait("the holder to take the layer", lambda: _status(client).get("served_layers") == 1)
        _wait("the holder to read every file", lambda: "the FUSE session holder reads every file of layer "
              f"{layer.digest}" in client.paths.log_file.read_text())
        before = _status(client)["reads_answered"]
        for name, data in files.items():
            assert _read_cold(d / name) == data, name
        assert _read_cold(d / "link.bin") == files["odd.bin"]
        with open(d / "big.bin", "rb") as f:            # reads that end past the end of the file
            assert os.pread(f.fileno(), 100, len(files["big.bin"]) - 10) == files["big.bin"][-10:]
            assert os.pread(f.fileno(), 100, len(files["big.bin"]) + 5) == b""
        after = _status(client)
        assert after["reads_answered"] - before >= len([d for d in files.values() if d])
        assert after["opcodes"]["15"][0] == 0, "no READ of the served layer went to the service"


def test_a_layer_still_fetched_has_reads_answered_by_the_holder_once_the_service_saw_them(
        registry, data_root, tmp_path):
    """No background fetch: the layer stays incomplete. The first READs of a span go to the
    service (the read-ahead, the read order); once a READ of each span of a file reached the
    service, reading the file again needs the service no more."""
    files = _files()
    layer, ztoc_bytes = _image(registry, tmp_path, "holder/partial", files)
    zdigest = store_ztoc(data_root, ztoc_bytes)
    config = write_config(tmp_path / "c.yaml")
    with running_service(data_root, config) as client:
        d = client.mount_layer(f"{registry.host}/holder/partial:latest", layer.digest, zdigest)
        _wait("the holder to take the layer", lambda: _status(client).get("served_layers") == 1)
        before = _service_reads(client)
        assert _read_cold(d / "big.bin") == files["big.bin"]
        assert _service_reads(client) > before, "the first reads of a file go to the service"
        # Spans read while they arrived still owe their read-ahead a first read from the cache, and
        # one still on its way to the disk when the service read it waits for the next; a READ the
        # service answers may bring in spans of the file no read asked for yet (the kernel's READs
        # fall elsewhere each time): a few reads of the file (up to five seen), and then its every
        # READ is the holder's.
        for _ in range(20):
            answered, before = _status(client)["reads_answered"], _service_reads(client)
            assert _read_cold(d / "big.bin") == files["big.bin"]
            if _service_reads(client) == before:
                break
        assert _service_reads(client) == before, "every span of the file was read before"
        assert _status(client)["reads_answered"] > answered
        assert _percent(client, layer.digest) < 100.0
        before = _service_reads(client)
        assert _read_cold(d / "odd.bin") == files["odd.bin"]
        assert _service_reads(client) > before, "spans no read touched before"
        order = client.request("read_order")["views"][0][2]
        ztoc = Ztoc.parse(ztoc_bytes)
        big = next(ztoc.entry(i) for i in range(len(ztoc)) if ztoc.entry(i).name == "big.bin")
        assert set(ztoc.spans_for(big.offset, big.offset + big.size)) <= set(order)


def test_the_holder_answers_lookups_of_names_a_directory_does_not_have(registry, data_root, tmp_path):
    files = _files()
    layer, ztoc_bytes = _image(registry, tmp_path, "holder/absent", files)
    zdigest = store_ztoc(data_root, ztoc_bytes)
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        d = client.mount_layer(f"{registry.host}/holder/absent:latest", layer.digest, zdigest)
        _wait("the holder to take the layer", lambda: _status(client).get("served_layers") == 1)

        def lookups() -> list[int]:
            return _status(client)["opcodes"].get("1", [0, 0])

        assert not (d / "dir/first-absent").exists()      # the service answers, and lists dir's names
        before = lookups()
        for i in range(5):
            assert not (d / f"dir/absent-{i}").exists()
        assert (d / "dir/inner.bin").read_bytes() == files["dir/inner.bin"]     # present: the service
        after = lookups()
        assert after[1] - before[1] == 5, "the absent names were answered by the holder"
        assert after[0] - before[0] >= 1, "a name the directory has goes to the service"
        # (each path walk also looks the layer's view up in the mount root: the service answers
        # those, never remembered, so that an unmounted layer is gone at once)
        assert not (d / "dir/absent-0").exists()      # remembered by the kernel: not asked again
        assert lookups()[1] == after[1]


def test_eviction_takes_the_layer_back_first_and_a_restart_hands_it_over_again(registry, data_root, tmp_path):
    files = _files()
    first, first_ztoc = _image(registry, tmp_path / "a", "holder/evicted", files)
    other = {"other.bin": os.urandom(3 << 20)}
    second, second_ztoc = _image(registry, tmp_path / "b", "holder/evicting", other)
    z1, z2 = store_ztoc(data_root, first_ztoc), store_ztoc(data_root, second_ztoc)
    size = Ztoc.parse(first_ztoc).uncompressed_size
    config = write_config(tmp_path / "c.yaml", background=True, quiet=0.2, interval_ms=5,
                          extra=f"  cache_max_bytes: {size + (1 << 20)}\n")
    with running_service(data_root, config) as client:
        d1 = client.mount_layer(f"{registry.host}/holder/evicted:latest", first.digest, z1)
        _wait("the holder to read every file", lambda: "the FUSE session holder reads every file of layer "
              f"{first.digest}" in client.paths.log_file.read_text())
        assert _read_cold(d1 / "big.bin") == files["big.bin"]
        # the second layer needs room: the first one's spans go, and the holder lets it go first
        d2 = client.mount_layer(f"{registry.host}/holder/evicting:latest", second.digest, z2)
        assert _read_cold(d2 / "other.bin") == other["other.bin"]
        _wait("the first layer to be evicted", lambda: _percent(client, first.digest) < 100.0)
        log = client.paths.log_file.read_text()
        assert f"the FUSE session holder no longer reads layer {d1.name}" in log
        for name, data in files.items():            # read again (fetched again, or handed over again)
            assert _read_cold(d1 / name) == data, name

    config = write_config(tmp_path / "c.yaml", background=True, quiet=0.2, interval_ms=5)
    complete = "the FUSE session holder reads every file of layer"
    before = client.paths.log_file.read_text().count(complete)     # the log goes on from the run above
    with running_service(data_root, config) as client:     # no limit now: both complete again
        _wait("both layers complete", lambda: client.paths.log_file.read_text().count(complete) >= before + 2,
              timeout=60)
        client.restart()
        _wait("both layers handed over after a restart", lambda: _status(client).get("served_layers") == 2)
        d1 = client.paths.mountpoint / d1.name
        for name, data in files.items():
            assert _read_cold(d1 / name) == data, name


def test_only_the_attached_service_hands_reads_over_and_bad_requests_are_refused(registry, data_root, tmp_path):
    config = write_config(tmp_path / "c.yaml")
    with running_service(data_root, config) as client:
        r, w = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(str(HolderPaths(client.paths.dir).socket))
                socket.send_fds(s, [json.dumps({"op": "serve", "slot": 1}).encode()], [r, w])
                reply = json.loads(s.recv(4096))
        finally:
            os.close(r)
            os.close(w)
        assert reply["ok"] is False and "attached service" in reply["error"]
        for bad in ({"op": "withdraw", "slot": "x"}, {"op": "withdraw"}, {"op": "leaving", "pid": [1]}):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(str(HolderPaths(client.paths.dir).socket))
                s.send(json.dumps(bad).encode())
                assert json.loads(s.recv(4096))["ok"] is False, bad
        assert _status(client)["served_layers"] == 0           # and the holder is still there


def test_the_whole_layer_check_reads_spans_as_they_arrive(tmp_path):
    """The reader the whole-layer check follows the background fetch with: it waits for spans
    and never fetches; once the layer's cache is closed it gives up."""
    layer = make_layer([Entry(f"f{i}", data=os.urandom(100_000)) for i in range(4)], "gzip")
    ztoc = Ztoc.parse(ztoc_for(layer, span_size=64 << 10))
    fetched: list[tuple[int, int]] = []

    def fetch(start: int, end: int) -> bytes:
        fetched.append((start, end))
        return layer.blob[start:end]

    spans = [ztoc.span_uncompressed_range(i) for i in range(ztoc.num_spans)]
    cache = SpanCache(tmp_path / "cache").layer(layer.digest, ztoc.digest, spans)
    fetcher = SpanFetcher(ztoc, fetch, cache, layer.digest)
    read = read_as_fetched(fetcher, poll_seconds=0.01)
    import threading
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(read(0, 512)))
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and not fetched, "it waits, and fetches nothing itself"
    fetcher.ensure([0], background=True)
    t.join(timeout=5)
    assert not t.is_alive() and got[0][257:262] == b"ustar"
    cache.close()
    with pytest.raises(LazyociError):
        read(spans[-1][0], spans[-1][1])


def test_a_service_that_records_reads_hands_none_to_the_holder(registry, data_root, tmp_path):
    """`soci optimize`'s service: a complete layer's READs still reach it, so it records them; it
    does not unpack the layer for containers either."""
    from lazyoci.service.paths import ServicePaths
    from lazyoci.store.layout import DataRoot

    files = _files()
    layer, ztoc_bytes = _image(registry, tmp_path, "holder/recorded", files)
    zdigest = store_ztoc(data_root, ztoc_bytes)
    paths = ServicePaths(DataRoot(data_root))
    paths.ensure()
    paths.records_reads.touch()
    config = write_config(tmp_path / "c.yaml", background=True, quiet=0.2, interval_ms=5)
    with running_service(data_root, config) as client:
        d = client.mount_layer(f"{registry.host}/holder/recorded:latest", layer.digest, zdigest)
        _wait("the layer to be complete", lambda: _percent(client, layer.digest) == 100.0)
        assert _read_cold(d / "big.bin") == files["big.bin"]
        assert _status(client)["served_layers"] == 0
        assert client.status()["layers"][0]["unpack"] == ""      # nor is it unpacked for containers
        order = client.request("read_order")["views"][0][2]
        ztoc = Ztoc.parse(ztoc_bytes)
        big = next(ztoc.entry(i) for i in range(len(ztoc)) if ztoc.entry(i).name == "big.bin")
        assert set(ztoc.spans_for(big.offset, big.offset + big.size)) <= set(order)
