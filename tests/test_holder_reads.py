"""READs answered by the FUSE session holder from the span cache, through the real service, holder,
kernel and registry: every READ of a complete, checked layer, and of a layer still being fetched
those of files and spans the service has read before; byte for byte, taken back before eviction
and handed over again after a restart."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _served_layer(registry, data_root, tmp_path: Path, repo: str, entries: list[Entry]):
    """One gzip layer of `entries` pushed as `repo`, mounted by a service of its own, handed to the
    holder: (client, the layer's directory, the layer)."""
    layer = make_layer(entries, "gzip")
    push_image(registry.host, repo, [layer], image_config([layer]), tmp_path)
    zdigest = store_ztoc(data_root, ztoc_for(layer, span_size=64 << 10))
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        d = client.mount_layer(f"{registry.host}/{repo}:latest", layer.digest, zdigest)
        _wait("the holder to take the layer", lambda: _status(client).get("served_layers") == 1)
        yield client, d, layer


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


def test_the_holder_answers_lookups_and_the_opaque_marker_of_checked_nodes_with_the_service_s_attributes(
        registry, data_root, tmp_path):
    """When a name is looked up in a directory, the service checks its children whose headers are
    cached and writes their entries: the holder answers their LOOKUPs, and GETXATTRs of overlayfs'
    opaque marker, with what the tar says."""
    files = {f"pkg/m{i}.py": os.urandom(100 + i) for i in range(12)}
    entries = [Entry("pkg/", kind="dir", mode=0o750, uid=7, gid=8, mtime=1_600_000_000),
               Entry("pkg/opq/", kind="dir"), Entry("pkg/opq/.wh..wh..opq"), Entry("pkg/sub/", kind="dir")]
    entries += [Entry(name, data=data, mode=0o600 + i, uid=1000 + i, gid=2000 + i, mtime=1_700_000_000 + i)
                for i, (name, data) in enumerate(files.items())]
    entries += [Entry("pkg/run", kind="file", data=b"#!/bin/sh\n", mode=0o4755),
                Entry("pkg/ln", kind="symlink", linkname="m3.py", mtime=1_650_000_000),
                Entry("pkg/hard", kind="hardlink", linkname="pkg/m5.py"),
                Entry("pkg/null", kind="char", devmajor=1, devminor=3, mode=0o666)]
    with _served_layer(registry, data_root, tmp_path, "holder/entries", entries) as (client, d, layer):

        def counts(opcode: int) -> list[int]:
            return _status(client)["opcodes"].get(str(opcode), [0, 0])

        # the first name looked up in pkg lists its names and checks its cached children (none
        # yet: the layer's one span comes with m0.py's own check), the second checks them again,
        # the cache having grown; names are looked up from pkg's descriptor (a path walk also looks the view up in the mount
        # root, which the service answers each time: never remembered)
        pkg = os.open(d / "pkg", os.O_RDONLY | os.O_DIRECTORY)
        try:
            def stat(name: str) -> os.stat_result:
                return os.stat(name, dir_fd=pkg, follow_symlinks=False)

            def opaque(name: str) -> bytes:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=pkg)
                try:
                    return os.getxattr(fd, "trusted.overlay.opaque")
                finally:
                    os.close(fd)

            assert stat("m0.py").st_size == 100
            _wait("the layer's one span on disk", lambda: _percent(client, layer.digest) == 100.0)
            assert stat("m1.py").st_size == 101
            lookups, xattrs = counts(1), counts(22)
            for i, (name, data) in enumerate(files.items()):
                st = stat(name.removeprefix("pkg/"))
                assert (st.st_mode, st.st_size, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns) == \
                    (0o100600 + i, len(data), 1000 + i, 2000 + i, 2 if i == 5 else 1, (1_700_000_000 + i) * 10**9), name
            run, ln, hard, null = (stat(n) for n in ("run", "ln", "hard", "null"))
            assert run.st_mode == 0o104755 and run.st_size == 10
            assert ln.st_mode == 0o120777 and ln.st_size == len("m3.py") and ln.st_mtime_ns == 1_650_000_000 * 10**9
            assert hard.st_ino == stat("m5.py").st_ino and hard.st_nlink == 2
            assert null.st_mode == 0o020666 and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
            assert opaque("opq") == b"y"
            with pytest.raises(OSError) as e:
                opaque("sub")
            assert e.value.errno == 61                # ENODATA
            assert os.readlink("ln", dir_fd=pkg) == "m3.py"
            after_lookups, after_xattrs = counts(1), counts(22)
        finally:
            os.close(pkg)
        assert after_lookups[0] == lookups[0], "every LOOKUP in pkg after the second was the holder's"
        assert after_lookups[1] - lookups[1] == len(files) - 2 + 6
        assert after_xattrs[0] == xattrs[0] and after_xattrs[1] - xattrs[1] == 2
        assert (d / "pkg/hard").read_bytes() == files["pkg/m5.py"]
        top = os.lstat(d / "pkg")
        assert (top.st_mode, top.st_uid, top.st_gid, top.st_mtime_ns) == (0o040750, 7, 8, 1_600_000_000 * 10**9)


def test_the_holder_ends_the_listing_of_a_listed_directory_and_the_service_gives_its_entries(
        registry, data_root, tmp_path):
    """The kernel reads a directory until a READDIR gives nothing: for a directory whose names the
    service listed (a name was looked up in it), the holder answers that last READDIR itself.
    Listings stay whole, over many READDIRs and for an empty directory, and a directory not
    listed yet has every READDIR go to the service."""
    many = {f"many/{'n' * 40}-{i:03d}": b"x" for i in range(200)}
    entries = [Entry("many/", kind="dir"), Entry("empty/", kind="dir"), Entry("unlisted/", kind="dir")]
    entries += [Entry(name, data=data) for name, data in many.items()]
    entries += [Entry(f"unlisted/f{i}", data=b"y") for i in range(3)]
    with _served_layer(registry, data_root, tmp_path, "holder/listings", entries) as (client, d, _):

        def listings() -> list[int]:
            """READDIRs and READDIRPLUSes: [relayed to the service, answered by the holder]."""
            ops = _status(client)["opcodes"]
            return [sum(ops.get(op, [0, 0])[i] for op in ("28", "44")) for i in (0, 1)]

        before = listings()       # the path walk looks "unlisted" up in the layer's root, nothing inside
        assert sorted(os.listdir(d / "unlisted")) == ["f0", "f1", "f2"]
        after = listings()
        assert after[1] == before[1], "no name was looked up inside: the service lists it all"
        assert after[0] - before[0] >= 2

        for directory, names in (("many", sorted(n.removeprefix("many/") for n in many)), ("empty", [])):
            assert not (d / directory / "absent").exists()      # lists the directory's names
            before = listings()
            assert sorted(os.listdir(d / directory)) == names, directory
            after = listings()
            assert after[1] - before[1] == 1, f"{directory}: the holder ended the listing"
            assert after[0] - before[0] >= (2 if names else 1), f"{directory}: the entries came from the service"
        waited = _status(client)["service_seconds"]       # what the relayed requests waited for
        assert waited["44" if "44" in waited else "28"] > 0 and waited["1"] > 0


def test_the_first_name_looked_up_in_a_directory_has_its_cached_children_checked(registry, data_root, tmp_path):
    """With the layer's span in the cache already, the first LOOKUP in a directory that reaches
    the service checks every child whose header is cached: the holder answers the next names."""
    entries = [Entry("other/", kind="dir"), Entry("other/warm", data=b"w"), Entry("pkg/", kind="dir")]
    entries += [Entry(f"pkg/m{i}.py", data=b"%d" % i) for i in range(6)]
    with _served_layer(registry, data_root, tmp_path, "holder/swept", entries) as (client, d, layer):
        assert (d / "other/warm").read_bytes() == b"w"
        _wait("the layer's one span on disk", lambda: _percent(client, layer.digest) == 100.0)

        def lookups() -> list[int]:
            return _status(client)["opcodes"].get("1", [0, 0])

        pkg = os.open(d / "pkg", os.O_RDONLY | os.O_DIRECTORY)
        try:
            before = lookups()
            assert os.stat("m0.py", dir_fd=pkg).st_size == 1
            first = lookups()
            sizes = [os.stat(f"m{i}.py", dir_fd=pkg).st_size for i in range(1, 6)]
            after = lookups()
        finally:
            os.close(pkg)
        assert sizes == [1] * 5
        assert first[0] - before[0] == 1, "the first name goes to the service"
        assert after[0] == first[0] and after[1] - first[1] == 5, "the holder answers the others"


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
