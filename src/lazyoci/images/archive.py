"""save / load: OCI archives that also carry docker's manifest.json, and docker-archive tarballs.

`save` writes one tar that is both an OCI image layout (index.json, oci-layout,
blobs/sha256/...) and a docker archive (manifest.json pointing at the same
blobs, as containerd's exporter does), so skopeo, podman and docker load it.
`load` reads either kind in one streaming pass: blobs go straight into the
store, verified against the digest in their name.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from lazyoci.errors import FormatError, IntegrityError, LazyociError, ReferenceError_, StoreError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.compression import SNIFF_BYTES, sniff_compression
from lazyoci.oci.digest import sha256_digest
from lazyoci.oci.manifest import Descriptor, ImageConfig, Index, Manifest, canonical_json, parse_any
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService

IMAGE_NAME_ANNOTATION = "io.containerd.image.name"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
_BLOB_RE = re.compile(r"^blobs/(sha256)/([0-9a-f]{64})$")
_SMALL = 16 << 20          # metadata files (json) kept in memory while reading an archive
_SMALL_TOTAL = 256 << 20   # ... and at most this much of them in all


def _blob_path(digest: str) -> str:
    algo, hexd = digest.split(":", 1)
    return f"blobs/{algo}/{hexd}"


# --- save --------------------------------------------------------------------------------

def save_archive(svc: "ImageService", path: "Path | BinaryIO", refs: list[str], platform: Platform | None) -> None:
    index_entries: list[dict] = []
    docker_entries: list[dict] = []
    blobs: dict[str, None] = {}     # ordered set
    for ref in refs:
        rec = svc.lookup(ref)
        top = rec.digest
        name: str | None
        try:
            name = str(Reference.parse(ref))
            if svc.records.lookup_name(name) != top:
                name = None
        except ReferenceError_:
            name = None
        names = [name] if name else svc.records.names_of(top)
        image = svc.get(top, platform)
        if rec.media_type in mt.IMAGE_INDEXES and platform is None and svc.blobs.has_index_content(Index.parse(svc.blobs.read(top))):
            desc = Descriptor(rec.media_type, top, svc.blobs.size(top) or 0)
            index = Index.parse(svc.blobs.read(top), rec.media_type)
            blobs[top] = None
            for d in index.manifests:
                blobs[d.digest] = None
                if d.media_type in mt.IMAGE_MANIFESTS:
                    m = Manifest.parse(svc.blobs.read(d.digest), d.media_type)
                    for b in (m.config, *m.layers):
                        blobs[b.digest] = None
        else:
            desc = image.manifest.descriptor()
        for b in (desc, image.manifest.descriptor(), image.manifest.config, *image.manifest.layers):
            if not svc.blobs.has(b.digest):
                raise StoreError(f"cannot save {ref}: blob {b.digest} is not stored locally (lazily pulled?)")
            blobs[b.digest] = None
        entry_names: list[str | None] = [*names] or [None]   # an unnamed image gets one entry
        for n in entry_names:
            ann = {}
            if n:
                r = Reference.parse(n)
                ann[IMAGE_NAME_ANNOTATION] = n
                if r.tag:
                    ann[REF_NAME_ANNOTATION] = r.tag
            index_entries.append(Descriptor(desc.media_type, desc.digest, desc.size, annotations=ann).to_json())
        docker_entries.append({
            "Config": _blob_path(image.manifest.config.digest),
            "RepoTags": [Reference.parse(n).familiar() for n in names if Reference.parse(n).tag],
            "Layers": [_blob_path(l.digest) for l in image.manifest.layers],
        })
    index_json = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": index_entries},
                            indent=None).encode()
    files = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index_json),
             ("manifest.json", json.dumps(docker_entries).encode())]
    _write_tar(svc, path, list(blobs), files)


def _write_tar(svc: "ImageService", path: "Path | BinaryIO", blobs: list[str],
               files: list[tuple[str, bytes]]) -> None:
    """Write the archive; to a path through a temporary file and rename, so a failed save
    leaves no partial archive. A lease keeps a concurrent `rmi` from deleting blobs meanwhile."""
    with svc.lease() as lease:
        lease.add(blobs)
        if not isinstance(path, (str, Path)):
            try:
                _tar_to(path, svc, blobs, files)
            except OSError as e:
                raise StoreError(f"cannot write the archive: {e.strerror or e}") from None
            return
        path = Path(path).absolute()
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise StoreError(f"cannot write {path}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                _tar_to(out, svc, blobs, files)
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise StoreError(f"cannot write {path}: {e.strerror or e}") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _tar_to(out: BinaryIO, svc: "ImageService", blobs: list[str], files: list[tuple[str, bytes]]) -> None:
    # Stream mode ("w|"): no seeking, so stdout and pipes work too.
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        for digest in blobs:
            ti = tarfile.TarInfo(_blob_path(digest))
            ti.size, ti.mode = svc.blobs.size(digest) or 0, 0o644
            with svc.blobs.open(digest) as f:
                tf.addfile(ti, f)
        for name, data in files:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))


# --- load --------------------------------------------------------------------------------

class _ArchiveReader:
    """One pass over the tar: blobs into the store, small files kept, other files ingested by content."""

    def __init__(self, svc: "ImageService", lease) -> None:
        self.svc = svc
        self.lease = lease
        self.small: dict[str, bytes] = {}
        self.files: dict[str, tuple[str, int]] = {}     # archive path -> (digest, size)
        self.links: dict[str, str] = {}
        self.new_blobs: set[str] = set()
        self._small_total = 0

    def read(self, path: "Path | BinaryIO") -> None:
        what = str(path) if isinstance(path, (str, Path)) else "the archive"
        try:
            if isinstance(path, (str, Path)):
                tf = tarfile.open(path, mode="r|*")
            else:
                tf = tarfile.open(fileobj=path, mode="r|*")
        except FileNotFoundError:
            raise StoreError(f"no such file: {what}") from None
        except (tarfile.TarError, OSError) as e:
            raise FormatError(f"{what} is not a tar archive: {e}") from None
        try:
            with tf:
                for m in tf:
                    self._member(tf, m)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise FormatError(f"{what}: broken archive: {e}") from None

    def _member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        name = posixpath.normpath(m.name.lstrip("/")).removeprefix("./")
        if m.issym():
            self.links[name] = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
            return
        if m.islnk():
            self.links[name] = posixpath.normpath(m.linkname.lstrip("/")).removeprefix("./")
            return
        if not m.isfile():
            return
        f = tf.extractfile(m)
        if f is None:   # a regular member always has its bytes
            raise FormatError(f"archive member {name} has no data")
        blob = _BLOB_RE.match(name)
        if blob:
            digest = f"{blob.group(1)}:{blob.group(2)}"
            self._ingest(f, digest, m.size, name)
            self.files[name] = (digest, m.size)
        elif m.size <= _SMALL and (name.endswith(".json") or name in ("oci-layout", "repositories")):
            self._small_total += m.size
            if self._small_total > _SMALL_TOTAL:
                raise FormatError(f"archive has more than {_SMALL_TOTAL >> 20} MiB of metadata files")
            self.small[name] = f.read()
        else:
            digest = self._ingest(f, None, m.size, name)
            self.files[name] = (digest, m.size)

    def _ingest(self, f, digest: str | None, size: int, name: str) -> str:
        if digest is not None:
            self.lease.add([digest])
            if self.svc.blobs.has(digest):
                return digest
        try:
            with self.svc.blobs.writer(digest, size) as w:
                while chunk := f.read(1 << 20):
                    w.write(chunk)
                result = w.commit()
        except IntegrityError as e:
            raise IntegrityError(f"archive member {name}: {e}", e.expected, e.actual) from None
        if digest is None:
            self.lease.add([result])
        self.new_blobs.add(result)
        return result

    def resolve(self, name: str) -> str:
        seen = 0
        while name in self.links and seen < 16:
            name, seen = self.links[name], seen + 1
        return name

    def bytes_of(self, name: str) -> bytes:
        name = self.resolve(name)
        if name in self.small:
            return self.small[name]
        if name in self.files:
            return self.svc.blobs.read(self.files[name][0])
        raise FormatError(f"archive lacks {name}")


def load_archive(svc: "ImageService", path: "Path | BinaryIO", log: Callable[[str], None] | None = None) -> list[str]:
    """Load every image of an OCI archive or docker archive; return the names (or IDs) loaded."""
    log = log or (lambda _line: None)
    svc.records.recover()
    with svc.lease() as lease:
        reader = _ArchiveReader(svc, lease)
        reader.read(path)
        if "index.json" in reader.small:
            images = _oci_images(svc, reader)
        elif "manifest.json" in reader.small:
            images = _docker_images(svc, reader)
        else:
            raise FormatError(f"{path if isinstance(path, (str, Path)) else 'the archive'}: neither an OCI archive (index.json) nor a docker archive (manifest.json)")
        loaded: list[str] = []
        released = False
        with svc.db.transaction() as c:
            for top, media_type, platforms, blobs, names in images:
                svc.records.record_content(c, top, media_type, "overlayfs", platforms, blobs)
                for n in names:
                    released |= svc.records.point_name(c, n, top)
                loaded.extend(names or [top])
            # Files of the archive that no image uses (e.g. a docker layer's `json`) go again.
            for d in reader.new_blobs:
                if not svc.records.held_by_other(c, d, lease.owner):
                    svc.blobs.delete(d)
        for line in loaded:
            log(f"Loaded image: {line}")
    if released:
        svc.gc()
    return loaded


def _names(*candidates: str | None) -> list[str]:
    out = []
    for c in candidates:
        if not c:
            continue
        try:
            out.append(str(Reference.parse(c)))
        except ReferenceError_:
            continue
    return out


def _oci_images(svc: "ImageService", reader: _ArchiveReader) -> list:
    try:
        index = Index.parse(reader.small["index.json"], mt.OCI_INDEX)
    except LazyociError as e:
        raise FormatError(f"index.json: {e}") from None
    docker = _docker_tags(reader)
    images = []
    for d in index.manifests:
        if d.media_type not in mt.ALL_MANIFESTS:
            continue
        raw = _blob(svc, d.digest, "manifest")
        obj = parse_any(raw, d.media_type)
        platforms, blobs = [], {d.digest}
        manifests = [(d, obj)] if isinstance(obj, Manifest) else [
            (m, Manifest.parse(_blob(svc, m.digest, "manifest"), m.media_type))
            for m in obj.image_manifests() if svc.blobs.has(m.digest)]
        for md, m in manifests:
            config = ImageConfig.parse(_blob(svc, m.config.digest, "config"))
            for l in m.layers:
                if not svc.blobs.has(l.digest):
                    raise FormatError(f"archive lacks layer {l.digest} of {md.digest}")
            platforms.append((md.digest, md.platform or config.platform, m.config.digest))
            blobs |= {md.digest, m.config.digest} | {l.digest for l in m.layers}
        if not platforms:
            raise FormatError(f"archive index {d.digest} has no image for any platform it carries")
        ann = d.annotations
        ref_name = ann.get(REF_NAME_ANNOTATION)
        names = _names(ann.get(IMAGE_NAME_ANNOTATION))
        if not names and ref_name and ("/" in ref_name or ":" in ref_name):
            names = _names(ref_name)
        if not names and isinstance(obj, Manifest):
            names = _names(*docker.get(obj.config.digest, []))
        images.append((d.digest, obj.media_type, platforms, blobs, names))
    if not images:
        raise FormatError("index.json lists no images")
    return images


def _blob(svc: "ImageService", digest: str, what: str) -> bytes:
    if not svc.blobs.has(digest):
        raise FormatError(f"archive lacks {what} {digest}")
    return svc.blobs.read(digest)


def _docker_manifest(reader: _ArchiveReader) -> list[dict]:
    try:
        entries = json.loads(reader.small["manifest.json"])
    except ValueError as e:
        raise FormatError(f"manifest.json is not valid JSON: {e}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise FormatError("manifest.json is not a list of images")
    return entries


def _docker_tags(reader: _ArchiveReader) -> dict[str, list[str]]:
    """Config digest -> RepoTags, from a docker manifest.json when the archive has one."""
    if "manifest.json" not in reader.small:
        return {}
    out = {}
    for e in _docker_manifest(reader):
        try:
            out[sha256_digest(reader.bytes_of(str(e.get("Config"))))] = list(e.get("RepoTags") or [])
        except LazyociError:
            continue
    return out


def _layer_media_type(svc: "ImageService", digest: str) -> str:
    with svc.blobs.open(digest) as f:
        compression = sniff_compression(f.read(SNIFF_BYTES))
    return {"gzip": mt.OCI_LAYER_GZIP, "zstd": mt.OCI_LAYER_ZSTD}.get(compression, mt.OCI_LAYER_TAR)


def _docker_images(svc: "ImageService", reader: _ArchiveReader) -> list:
    images = []
    for e in _docker_manifest(reader):
        config_raw = reader.bytes_of(str(e.get("Config")))
        config = ImageConfig.parse(config_raw)
        config_digest = sha256_digest(config_raw)
        reader.lease.add([config_digest])
        svc.blobs.put_bytes(config_raw, config_digest)
        layer_paths = e.get("Layers") or []
        if len(layer_paths) != len(config.diff_ids):
            raise FormatError(f"manifest.json lists {len(layer_paths)} layers but the config has "
                              f"{len(config.diff_ids)} diff_ids")
        layers = []
        for lp, diff_id in zip(layer_paths, config.diff_ids):
            name = reader.resolve(str(lp))
            if name not in reader.files:
                raise FormatError(f"archive lacks layer {lp}")
            digest, size = reader.files[name]
            media_type = _layer_media_type(svc, digest)
            if media_type == mt.OCI_LAYER_TAR:
                if digest != diff_id:
                    raise IntegrityError(f"layer {lp} does not match the config's diff_id {diff_id}",
                                         diff_id, digest)
                svc.record_layer_size(digest, size)
            layers.append(Descriptor(media_type, digest, size))
        manifest_raw = canonical_json({
            "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
            "config": Descriptor(mt.OCI_CONFIG, config_digest, len(config_raw)).to_json(),
            "layers": [l.to_json() for l in layers],
        })
        top = sha256_digest(manifest_raw)
        reader.lease.add([top])
        svc.blobs.put_bytes(manifest_raw, top)
        blobs = {top, config_digest} | {l.digest for l in layers}
        images.append((top, mt.OCI_MANIFEST, [(top, config.platform, config_digest)], blobs,
                       _names(*(e.get("RepoTags") or []))))
    if not images:
        raise FormatError("manifest.json lists no images")
    return images
