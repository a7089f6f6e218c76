"""import: an image from a root filesystem (a tarball or a directory), as `docker import` makes one.

The result is one gzip layer (its diff ID computed from the uncompressed tar as
it streams), an OCI image config and an OCI manifest; `--change` applies
Dockerfile-style CMD/ENTRYPOINT/ENV/WORKDIR/USER/LABEL/EXPOSE/STOPSIGNAL/VOLUME.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, BinaryIO, cast

_zlib: ModuleType
try:
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover
    import zlib as _zlib

from lazyoci.errors import ConfigError, FormatError, StoreError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.compression import SNIFF_BYTES, decode_errors, open_decompressed, sniff_compression
from lazyoci.oci.digest import sha256_digest
from lazyoci.oci.manifest import Descriptor, canonical_json
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService, LocalImage

_CHUNK = 1 << 20
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class ConfigChanges:
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=lambda: [DEFAULT_PATH])
    workdir: str | None = None
    user: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    exposed: dict[str, dict] = field(default_factory=dict)
    volumes: dict[str, dict] = field(default_factory=dict)
    stop_signal: str | None = None

    def to_json(self) -> dict:
        out: dict = {"Env": self.env}
        for key, value in (("Cmd", self.cmd), ("Entrypoint", self.entrypoint), ("WorkingDir", self.workdir),
                           ("User", self.user), ("StopSignal", self.stop_signal)):
            if value is not None:
                out[key] = value
        for key, table in (("Labels", self.labels), ("ExposedPorts", self.exposed), ("Volumes", self.volumes)):
            if table:
                out[key] = table
        return out


def _command(args: str) -> list[str]:
    """JSON (exec) form or shell form, as a Dockerfile reads them."""
    if args.startswith("["):
        try:
            value = json.loads(args)
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return ["/bin/sh", "-c", args]


def _pairs(args: str, what: str) -> list[tuple[str, str]]:
    try:
        words = shlex.split(args)
    except ValueError as e:
        raise ConfigError(f"--change {what}: {e}") from None
    if words and "=" not in words[0]:
        if len(words) < 2:
            raise ConfigError(f"--change {what} needs KEY=VALUE or KEY VALUE")
        return [(words[0], args.split(None, 1)[1].strip())]
    out = []
    for w in words:
        key, sep, value = w.partition("=")
        if not sep or not key:
            raise ConfigError(f"--change {what}: {w!r} is not KEY=VALUE")
        out.append((key, value))
    return out


def parse_changes(changes: tuple[str, ...] | list[str]) -> ConfigChanges:
    cfg = ConfigChanges()
    for change in changes:
        instr, _, args = change.strip().partition(" ")
        instr, args = instr.upper(), args.strip()
        if not args:
            raise ConfigError(f"--change {change!r}: {instr or 'instruction'} needs an argument")
        if instr == "CMD":
            cfg.cmd = _command(args)
        elif instr == "ENTRYPOINT":
            cfg.entrypoint = _command(args)
        elif instr == "ENV":
            for key, value in _pairs(args, "ENV"):
                cfg.env = [e for e in cfg.env if e.split("=", 1)[0] != key] + [f"{key}={value}"]
        elif instr == "LABEL":
            cfg.labels.update(_pairs(args, "LABEL"))
        elif instr == "WORKDIR":
            cfg.workdir = args
        elif instr == "USER":
            cfg.user = args
        elif instr == "EXPOSE":
            for port in args.split():
                cfg.exposed[port if "/" in port else f"{port}/tcp"] = {}
        elif instr == "VOLUME":
            listed = _command(args)
            for v in listed if listed[:2] != ["/bin/sh", "-c"] else args.split():
                cfg.volumes[v] = {}
        elif instr == "STOPSIGNAL":
            cfg.stop_signal = args
        else:
            raise ConfigError(f"--change {change!r}: unsupported instruction {instr} "
                              "(CMD, ENTRYPOINT, ENV, LABEL, WORKDIR, USER, EXPOSE, VOLUME, STOPSIGNAL)")
    return cfg


class _LayerSink:
    """Receives the uncompressed tar: hashes it (diff ID), counts it, gzips it into the blob writer."""

    def __init__(self, writer) -> None:
        self.writer = writer
        self.diff = hashlib.sha256()
        self.size = 0
        self._gz = _zlib.compressobj(2, _zlib.DEFLATED, 31)

    def write(self, data: bytes) -> int:
        self.diff.update(data)
        self.size += len(data)
        out = self._gz.compress(data)
        if out:
            self.writer.write(out)
        return len(data)

    def close(self) -> None:
        self.writer.write(self._gz.flush())


def _decompressor(f: BinaryIO) -> BinaryIO:
    """A tarball may be compressed as docker import takes it: its first bytes say how."""
    head = f.read(SNIFF_BYTES)
    f.seek(0)
    return open_decompressed(f, sniff_compression(head))


def _copy_tarball(source: Path, sink: _LayerSink) -> None:
    try:
        with open(source, "rb") as raw:
            f = _decompressor(raw)
            first = f.read(tarfile.BLOCKSIZE)
            try:
                tarfile.TarInfo.frombuf(first, tarfile.ENCODING, "surrogateescape")
            except tarfile.HeaderError:
                raise FormatError(f"{source} is not a tar archive") from None
            sink.write(first)
            while chunk := f.read(_CHUNK):
                sink.write(chunk)
    except decode_errors() as e:
        raise FormatError(f"{source}: broken compressed stream: {e}") from None
    except OSError as e:
        raise StoreError(f"cannot read {source}: {e.strerror or e}") from None


def _tar_directory(source: Path, sink: _LayerSink) -> None:
    """A tar of the tree, sorted so the same tree gives the same layer; owners kept numeric."""
    # A stream ("w|") only writes to its file; the stubs ask for a seekable one.
    with tarfile.open(fileobj=cast(IO[bytes], sink), mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, source)
            entries = [(d, True) for d in dirnames] + [(f, False) for f in sorted(filenames)]
            for name, _is_dir in entries:
                full = os.path.join(dirpath, name)
                arc = name if rel_dir == "." else f"{rel_dir}/{name}"
                # None for a socket, which the stubs do not say
                ti = cast("tarfile.TarInfo | None", tf.gettarinfo(full, arcname=arc))
                if ti is None:
                    continue        # sockets and the like cannot be in a layer
                ti.uname = ti.gname = ""
                if ti.isfile():
                    with open(full, "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)


def import_rootfs(svc: "ImageService", source: Path, ref: str, changes: tuple[str, ...] | list[str],
                  platform: Platform | None) -> "LocalImage":
    name = str(Reference.parse(ref))
    cfg = parse_changes(changes)
    plat = platform or Platform.host()
    source = Path(source)
    if not source.exists():
        raise StoreError(f"no such file or directory: {source}")
    svc.records.recover()
    with svc.lease() as lease:
        writer = svc.blobs.writer(None)
        sink = _LayerSink(writer)
        try:
            if source.is_dir():
                _tar_directory(source, sink)
            else:
                _copy_tarball(source, sink)
            sink.close()
            layer_digest = writer.commit()
        except BaseException:
            writer.abort()
            raise
        lease.add([layer_digest])
        diff_id = "sha256:" + sink.diff.hexdigest()
        svc.record_layer_size(layer_digest, sink.size)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        config: dict[str, object] = {"architecture": plat.architecture, "os": plat.os}
        if plat.variant:
            config["variant"] = plat.variant
        config.update({
            "created": created, "config": cfg.to_json(),
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": created, "created_by": "lazyoci import",
                         "comment": f"Imported from {source.name}"}],
        })
        config_raw = canonical_json(config)
        manifest_raw = canonical_json({
            "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
            "config": Descriptor(mt.OCI_CONFIG, sha256_digest(config_raw), len(config_raw)).to_json(),
            "layers": [Descriptor(mt.OCI_LAYER_GZIP, layer_digest, writer.count).to_json()],
        })
        config_digest, top = sha256_digest(config_raw), sha256_digest(manifest_raw)
        lease.add([config_digest, top])
        svc.blobs.put_bytes(config_raw, config_digest)
        svc.blobs.put_bytes(manifest_raw, top)
        with svc.db.transaction() as c:
            svc.records.record_content(c, top, mt.OCI_MANIFEST, "overlayfs", [(top, plat, config_digest)],
                                       {top, config_digest, layer_digest})
            released = svc.records.point_name(c, name, top)
    if released:
        svc.gc()
    return svc.get(name, plat)
