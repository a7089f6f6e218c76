"""Hostile zTOCs through the real service: every entry is checked against its own tar header.

Each zTOC here is built by lazyoci's builder from a real gzip layer, then one entry is
rewritten with the project's FlatBuffer encoder. The span digests stay right (the bytes
in the registry are honest), so only the header check can catch the lie: the entry must
be EIO or absent, never served with the wrong bytes or attributes.
"""

from __future__ import annotations

import errno
import io
import os
import random
import stat
import time
from pathlib import Path

import pytest

from helpers.fault_proxy import FaultProxy
from helpers.hostile_ztoc import Edit, edited_ztoc, swapped_offsets
from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import running_service, store_ztoc, write_config
from lazyoci.ztoc.toc import TarEntry

pytestmark = pytest.mark.needs_root("FUSE mounts")

SPAN = 64 << 10
BIG = random.Random(9).randbytes(2 << 20)      # incompressible


def _entries() -> list[Entry]:
    return [
        Entry("bin", "dir"), Entry("data", "dir"), Entry("etc", "dir"),
        Entry("forged", "dir", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),   # not overlay's to say
        Entry("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o755),
        Entry("data/f1.bin", data=b"A" * 5000),
        Entry("data/f2.bin", data=b"B" * 5000),
        Entry("data/link", "symlink", linkname="f1.bin"),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry(".wh.old"),
        Entry("etc/owned", data=b"mine\n", uid=1000, gid=1000),
        Entry("data/big1", data=BIG[:1 << 20]),          # many spans: a read fetches only a few
        Entry("etc/after", data=b"after the whiteout\n"),
        Entry("data/big2", data=BIG[1 << 20:]),
        Entry(".wh.last"),
    ]


@pytest.fixture(scope="module")
def layer(registry, tmp_path_factory):
    lay = make_layer(_entries())
    push_image(registry.host, "verify/app", [lay], image_config([lay]), tmp_path_factory.mktemp("verify-app"))
    return lay


def _ztoc(blob: bytes, edit: Edit | None = None) -> bytes:
    return edited_ztoc(blob, SPAN, edit)


def _find(entries: list[TarEntry], name: bytes) -> int:
    return next(i for i, e in enumerate(entries) if e.name == name)


def _set(entry: bytes, **fields) -> Edit:
    def edit(entries: list[TarEntry]) -> list[TarEntry]:
        i = _find(entries, entry)
        entries[i] = entries[i]._replace(**fields)
        return entries
    return edit


_swap_offsets = swapped_offsets(b"data/f1.bin", b"data/f2.bin")


def _drop(name: bytes) -> Edit:
    def edit(entries: list[TarEntry]) -> list[TarEntry]:
        del entries[_find(entries, name)]
        return entries
    return edit


def _eio(path: Path, read: bool = False) -> None:
    with pytest.raises(OSError) as exc:
        path.read_bytes() if read else os.lstat(path)
    assert exc.value.errno == errno.EIO, f"{path}: {exc.value}"


def _mount(client, registry, root: Path, layer, edit: Edit | None) -> Path:
    return client.mount_layer(f"{registry.host}/verify/app:latest", layer.digest, store_ztoc(root, _ztoc(layer.blob, edit)))


CASES = {
    "swapped data offsets": (_swap_offsets, ["data/f1.bin", "data/f2.bin"]),
    "setuid mode": (_set(b"bin/tool", mode=0o4777), ["bin/tool"]),
    "file turned into a block device": (_set(b"etc/passwd", type="block", devmajor=254, devminor=0, size=0),
                                        ["etc/passwd"]),
    "other uid": (_set(b"etc/owned", uid=0, gid=0), ["etc/owned"]),
    "retargeted symlink": (_set(b"data/link", linkname=b"/etc/shadow"), ["data/link"]),
    "renamed file": (_set(b"etc/passwd", name=b"etc/shadow"), ["etc/shadow"]),
    "dropped whiteout": (_drop(b".wh.old"), ["etc/owned"]),   # its header now sits before etc/owned's
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_entry_is_eio_never_wrong(registry, layer, data_root, tmp_path, case):
    edit, tampered = CASES[case]
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        d = _mount(client, registry, data_root, layer, edit)
        for rel in tampered:
            _eio(d / rel)
        # the honest entries of the same layer are served as they are
        assert (d / "etc/after").read_bytes() == b"after the whiteout\n"
        assert stat.S_IMODE(os.lstat(d / "data").st_mode) == 0o755
        if case == "dropped whiteout":
            assert not os.path.lexists(d / "old")
        assert "does not match its tar header" in client.paths.log_file.read_text()


def test_a_whiteout_dropped_at_the_end_breaks_the_layer_once_it_is_cached(registry, layer, data_root, tmp_path):
    """Nothing follows the last entry, so only the whole-layer check sees that `.wh.last` was hidden."""
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        d = _mount(client, registry, data_root, layer, _drop(b".wh.last"))
        assert (d / "etc/after").read_bytes() == b"after the whiteout\n"
        assert (d / "data/big1").read_bytes() + (d / "data/big2").read_bytes() == BIG   # now every span is cached
        deadline = time.monotonic() + 60      # the check runs in a thread: wait for it, not for a time
        while "is broken" not in client.paths.log_file.read_text():
            assert time.monotonic() < deadline, "the whole-layer check did not run"
            time.sleep(0.05)
        _eio(d / "etc/passwd", read=True)
        # a file read before: nor does the FUSE session holder answer its READs any more
        with pytest.raises(OSError) as exc:
            fd = os.open(d / "data/big1", os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.pread(fd, 1 << 20, 0)
            finally:
                os.close(fd)
        assert exc.value.errno == errno.EIO
        assert "the tar has an entry the zTOC lacks: '.wh.last'" in client.paths.log_file.read_text()


def test_the_honest_ztoc_serves_every_entry(registry, layer, data_root, tmp_path):
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        d = _mount(client, registry, data_root, layer, None)
        assert (d / "data/f1.bin").read_bytes() == b"A" * 5000
        assert (d / "data/f2.bin").read_bytes() == b"B" * 5000
        assert os.readlink(d / "data/link") == "f1.bin"
        assert os.lstat(d / "etc/owned").st_uid == 1000
        assert stat.S_IMODE(os.lstat(d / "bin/tool").st_mode) == 0o755
        assert stat.S_ISCHR(os.lstat(d / "old").st_mode) and stat.S_ISCHR(os.lstat(d / "last").st_mode)
        assert (d / "data/big1").read_bytes() + (d / "data/big2").read_bytes() == BIG
        with pytest.raises(OSError):     # the unpacker never sets overlay's own xattrs from a layer
            os.getxattr(d / "forged", "trusted.overlay.opaque", follow_symlinks=False)
        deadline = time.monotonic() + 60      # every span is cached now: the whole-layer check passes
        while "every tar header matches its zTOC" not in client.paths.log_file.read_text():
            assert time.monotonic() < deadline, "the whole-layer check did not run"
            time.sleep(0.05)
        assert "is broken" not in client.paths.log_file.read_text()


def test_two_indexes_of_one_layer_never_share_a_view(registry, layer, data_root, tmp_path):
    """Image A's hostile index and image B's honest one for a shared layer: B sees the truth,
    also after A's view is gone."""
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        hostile = store_ztoc(data_root, _ztoc(layer.blob, _swap_offsets))
        honest = store_ztoc(data_root, _ztoc(layer.blob))
        a = client.mount_layer(f"{registry.host}/verify/app:latest", layer.digest, hostile)
        b = client.mount_layer(f"{registry.host}/verify/app:latest", layer.digest, honest)
        assert a != b
        _eio(a / "data/f1.bin")
        assert (b / "data/f1.bin").read_bytes() == b"A" * 5000
        assert client.unmount_layer(layer.digest, hostile)
        assert not a.exists()
        assert (b / "data/f2.bin").read_bytes() == b"B" * 5000
        assert {(l["layer_digest"], l["ztoc_digest"]) for l in client.status()["layers"]} == {(layer.digest, honest)}


def test_soci_verify_false_is_refused(tmp_path):
    from lazyoci.config import load_config
    from lazyoci.errors import ConfigError

    path = write_config(tmp_path / "c.yaml", extra="  verify: false\n")
    with pytest.raises(ConfigError, match="cannot be turned off"):
        load_config(path)
    assert load_config(write_config(tmp_path / "ok.yaml", extra="  verify: true\n")).soci is not None


def test_after_a_restart_a_layer_fetches_through_the_current_reference(registry, layer, data_root, tmp_path):
    """The view was first mounted through a proxy that is gone after the restart; the layer is
    then fetched through the reference a later pull recorded."""
    from lazyoci.config import load_config
    from lazyoci.snapshot.soci import LazyLayerRecord, SociSnapshotter
    from lazyoci.store.layout import DataRoot

    config = write_config(tmp_path / "c.yaml")
    zdigest = store_ztoc(data_root, _ztoc(layer.blob))
    with FaultProxy(registry.host) as proxy:
        with running_service(data_root, config) as client:
            d = client.mount_layer(f"{proxy.host}/verify/app:latest", layer.digest, zdigest)
            assert os.path.isdir(d)                  # mounted, nothing read: no span cached
    # a later pull of the image, straight from the registry, recorded the layer's new source
    snap = SociSnapshotter(DataRoot(data_root), load_config(config))
    snap.record_lazy_layer(LazyLayerRecord(layer.digest, zdigest, f"{registry.host}/verify/app:latest",
                                           "sha256:" + "0" * 64))
    with running_service(data_root, config) as client:     # mounts the recorded view again, same path
        assert (d / "etc/passwd").read_bytes() == b"root:x:0:0:root:/root:/bin/sh\n"


def test_a_ztoc_listing_entries_out_of_stream_order_still_checks_every_entry(layer):
    """Writers list entries in stream order; another order is valid and must not be refused."""
    import gzip

    from lazyoci.fs.header_check import GOOD, LayerVerifier
    from lazyoci.ztoc import Ztoc

    ztoc = Ztoc.parse(_ztoc(layer.blob, lambda entries: entries[::-1]))
    raw = gzip.decompress(layer.blob)
    read = lambda start, end: raw[start:end]
    v = LayerVerifier(ztoc, read, read, layer.digest)
    v.check(list(range(len(ztoc))))
    assert all(s == GOOD for s in v.state)
    v.check_layer()
    assert v.broken is None


def test_the_whole_layer_check_reads_the_headers_not_the_file_data(layer):
    """The tar's tiling is in its headers; file data is proven by the span digests, so the check
    skips it (it runs while a workload reads) and still reads every header."""
    import gzip

    from lazyoci.fs.header_check import GOOD, LayerVerifier
    from lazyoci.ztoc import Ztoc

    ztoc = Ztoc.parse(_ztoc(layer.blob))
    raw = gzip.decompress(layer.blob)
    asked: list[int] = []

    def read(start: int, end: int) -> bytes:
        asked.append(end - start)
        return raw[start:end]

    v = LayerVerifier(ztoc, read, read, layer.digest)
    v.check_layer()
    assert v.broken is None and all(s == GOOD for s in v.state)
    assert sum(asked) < len(raw) - len(BIG) // 2, (sum(asked), len(raw))


def test_releasing_snapshots_unmounts_a_view_through_another_index(registry, data_root, tmp_path):
    """A layer served through the index its snapshots use stays; its view through another
    index (an image removed since) goes."""
    from helpers.lazy import push_soci_index
    from lazyoci.images.service import ImageService
    from lazyoci.config import load_config
    from lazyoci.service.client import ServiceClient
    from lazyoci.snapshot.soci import SociSnapshotter, snapshot_keys
    from lazyoci.store.layout import DataRoot

    lay = make_layer(_entries())
    push_image(registry.host, "verify/release", [lay], image_config([lay]), tmp_path)
    push_soci_index(registry.host, "verify/release", tmp_path)
    config = write_config(tmp_path / "c.yaml", extra="snapshotters:\n  - soci\n")
    root = DataRoot(data_root)
    images = ImageService(root)
    snap = SociSnapshotter(root, load_config(config), client=images.client)
    client = ServiceClient(root, config)
    try:
        image = snap.pull(images, f"{registry.host}/verify/release:latest")
        top = snap.unpack_image(images, image)
        used = snap.lazy_layer(lay.digest).ztoc_digest
        other = store_ztoc(data_root, _ztoc(lay.blob, _swap_offsets))
        client.mount_layer(f"{registry.host}/verify/release:latest", lay.digest, other)
        assert len(client.status()["layers"]) == 2
        snap.release_unused({top})
        assert [(l["layer_digest"], l["ztoc_digest"]) for l in client.status()["layers"]] == [(lay.digest, used)]
        assert snapshot_keys(list(image.config.diff_ids), [used]) == [top]   # the chain ID and the zTOC
    finally:
        images.close()
        client.stop()


def test_a_listing_hands_the_kernel_no_unchecked_attributes(registry, layer, data_root, tmp_path):
    """READDIRPLUS gives the kernel attributes with each name: those of a tampered entry must not
    stick, whether its header is cached (checked in the listing, failed) or not (zero timeouts)."""
    with running_service(data_root, write_config(tmp_path / "c.yaml")) as client:
        d = _mount(client, registry, data_root, layer, _set(b"bin/tool", mode=0o4777))
        assert sorted(os.listdir(d / "bin")) == ["tool"]          # names and types: the zTOC's
        _eio(d / "bin/tool")
        assert (d / "etc/passwd").read_bytes().startswith(b"root:")  # its span holds bin/tool's header too
        assert sorted(os.listdir(d / "bin")) == ["tool"]
        _eio(d / "bin/tool")
        with pytest.raises(OSError) as exc:
            os.stat(d / "bin/tool")
        assert exc.value.errno == errno.EIO
        for name in os.listdir(d / "etc"):                       # checked in the listing: served
            assert os.lstat(d / "etc" / name).st_uid in (0, 1000)


LONG = "d/" + "n" * 120      # over the 100 bytes of a tar header's name field


def _stretched_layer(records: str):
    """Layer a, b, c where b's PAX records say uid 1000 (its ustar field 0), or b's GNU long-name
    header carries its name (its main header a truncated one); and how a lying zTOC names b."""
    import tarfile

    from helpers.images import tar_bytes

    if records == "pax":
        b = Entry("b", data=b"#!/bin/sh\nid\n", mode=0o4755, uid=0, pax={"uid": "1000"})
        return make_layer([Entry("a", data=b"x" * 100), b, Entry("c", data=b"after\n")]), b"b"
    entries = [Entry("a", data=b"x" * 100), Entry(LONG, data=b"#!/bin/sh\nid\n", mode=0o4755),
               Entry("c", data=b"after\n")]
    return make_layer(tar_bytes(entries, format=tarfile.GNU_FORMAT)), LONG.encode()


@pytest.mark.parametrize("records", ["pax", "gnu"])
def test_a_predecessor_stretched_over_the_records_after_it_passes_nothing(records):
    """A zTOC may stretch entry `a`'s data over the PAX or GNU long-name header of entry `b`
    after it, so that `b`'s header region holds only its main header: `b` must not pass with
    that header's fields (uid 0, a truncated name) when its records (uid 1000, the whole name)
    are what the tar means."""
    import gzip

    from lazyoci.errors import IntegrityError
    from lazyoci.fs.header_check import GOOD, LayerVerifier
    from lazyoci.ztoc import Ztoc

    from helpers.hostile_ztoc import ztoc_parts

    lay, b_name = _stretched_layer(records)
    raw = gzip.decompress(lay.blob)
    read = lambda start, end: raw[start:end]
    parts = ztoc_parts(lay.blob, SPAN)
    entries = list(parts.entries)
    a, b, c = (_find(entries, n) for n in (b"a", b_name, b"c"))
    honest = LayerVerifier(Ztoc.parse(parts.encode()), read, read, lay.digest)
    honest.check([a, b, c])
    assert all(s == GOOD for s in honest.state)

    main_header = entries[b].offset - 512
    entries[a] = entries[a]._replace(size=main_header - entries[a].offset)
    if records == "pax":
        assert entries[b].uid == 1000
        entries[b] = entries[b]._replace(uid=0)
    else:
        truncated = raw[main_header:main_header + 100].rstrip(b"\0")
        assert truncated != b_name and b_name.startswith(truncated)
        entries[b] = entries[b]._replace(name=truncated)
    v = LayerVerifier(Ztoc.parse(parts.encode(entries)), read, read, lay.digest)
    with pytest.raises(IntegrityError):
        v.check([b])
    with pytest.raises(IntegrityError):
        v.check([a])
    v.check([c])             # its region follows b's honest size: served
    assert v.state[c] == GOOD


def test_a_hardlink_header_with_a_size_does_not_move_the_next_region():
    """Header-only types carry no data whatever their size field says (Go's rule, which the
    unpacker follows): a hardlink header with a size before two files must not make the check
    of the second (its predecessor's region read first) look for a header past it."""
    import gzip
    import tarfile

    from lazyoci.fs.header_check import GOOD, LayerVerifier
    from lazyoci.ztoc import Ztoc

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("a", b"x" * 100),):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("h")
        link.type, link.linkname, link.size = tarfile.LNKTYPE, "a", 100    # no data follows
        tf.addfile(link)
        for name, data in (("b", b"y" * 700), ("c", b"z" * 10)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    lay = make_layer(buf.getvalue())
    raw = gzip.decompress(lay.blob)
    read = lambda start, end: raw[start:end]
    ztoc = Ztoc.parse(_ztoc(lay.blob))
    h = next(i for i in range(len(ztoc)) if ztoc.entry(i).name == "h")
    assert ztoc.entry(h).size == 100
    v = LayerVerifier(ztoc, read, read, lay.digest)
    v.check([len(ztoc) - 1])          # c first: b's end is read from b's header, after h's
    v.check(list(range(len(ztoc))))
    assert all(s == GOOD for s in v.state)


def test_check_results_kept_in_the_span_cache_outlive_the_verifier(layer, tmp_path):
    """A new service process (a restart, another image with the layer) reads the results of the
    checks before it from the span cache and checks no good entry again; an entry found bad is
    checked again, so that its failure is logged and refused by the new process too."""
    import gzip

    from lazyoci.errors import IntegrityError
    from lazyoci.fs.header_check import BAD, GOOD, UNCHECKED, LayerVerifier
    from lazyoci.fs.span_cache import LayerCache
    from lazyoci.ztoc import Ztoc

    ztoc = Ztoc.parse(_ztoc(layer.blob, _set(b"etc/owned", uid=0, gid=0)))
    raw = gzip.decompress(layer.blob)
    spans = [ztoc.span_uncompressed_range(i) for i in range(ztoc.num_spans)]
    asked: list[tuple[int, int]] = []

    def read(start: int, end: int) -> bytes:
        asked.append((start, end))
        return raw[start:end]

    def open_cache() -> LayerCache:
        return LayerCache(tmp_path / "cache", "sha256:" + "1" * 64, spans)

    owned = next(i for i in range(len(ztoc)) if ztoc.entry(i).name.rstrip("/") == "etc/owned")
    cache = open_cache()
    first = LayerVerifier(ztoc, read, read, layer.digest, state=cache.entry_states(len(ztoc)))
    with pytest.raises(IntegrityError):
        first.check([owned])
    good = [i for i in range(len(ztoc)) if i != owned]
    first.check(good)
    assert first.state[owned] == BAD and all(first.state[i] == GOOD for i in good)
    cache.close()

    cache, asked[:] = open_cache(), []
    again = LayerVerifier(ztoc, read, read, layer.digest, state=cache.entry_states(len(ztoc)))
    assert again.unchecked(good) == [] and again.state[owned] == UNCHECKED
    again.check(good)
    assert asked == []                    # nothing read: every good entry was known good
    with pytest.raises(IntegrityError):
        again.check([owned])
    cache.close()

    other = LayerCache(tmp_path / "cache", "sha256:" + "2" * 64, spans)     # another zTOC: no results
    assert set(other.entry_states(len(ztoc))) == {UNCHECKED}
    other.close()
