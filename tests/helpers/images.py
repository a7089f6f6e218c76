"""Build test images with Python's tarfile and push them with skopeo (an independent tool).

Tests use these so that what lazyoci reads is made by something other than lazyoci.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Entry:
    """One tar entry. kind: file, dir, symlink, hardlink, char, block, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    mtime: float = 1_700_000_000
    pax: dict[str, str] = field(default_factory=dict)


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
          "fifo": tarfile.FIFOTYPE}


def tar_bytes(entries: list[Entry], format: int = tarfile.PAX_FORMAT) -> bytes:
    """An uncompressed tar stream of `entries`, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.kind]
            ti.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            ti.uid, ti.gid = e.uid, e.gid
            ti.mtime = e.mtime
            ti.linkname = e.linkname
            ti.devmajor, ti.devminor = e.devmajor, e.devminor
            ti.pax_headers = dict(e.pax)
            if e.kind == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


@dataclass
class Layer:
    blob: bytes         # the bytes as stored in the registry
    diff_id: str        # digest of the uncompressed tar
    media_type: str

    @property
    def digest(self) -> str:
        return sha(self.blob)


def make_layer(entries: list[Entry] | bytes, compression: str = "gzip") -> Layer:
    """A layer from entries (or ready tar bytes): gzip (deterministic), none, or zstd."""
    raw = entries if isinstance(entries, bytes) else tar_bytes(entries)
    if compression == "gzip":
        blob = gzip.compress(raw, compresslevel=6, mtime=0)
        mtype = LAYER_GZIP
    elif compression == "none":
        blob, mtype = raw, LAYER_TAR
    elif compression == "zstd":
        import zstandard
        blob, mtype = zstandard.ZstdCompressor().compress(raw), LAYER_ZSTD
    else:
        raise ValueError(compression)
    return Layer(blob, sha(raw), mtype)


def image_config(layers: list[Layer], cmd: list[str] | None = None, env: list[str] | None = None,
                 entrypoint: list[str] | None = None, workdir: str = "", user: str = "") -> bytes:
    cfg: dict = {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    if cmd is not None:
        cfg["Cmd"] = cmd
    if entrypoint is not None:
        cfg["Entrypoint"] = entrypoint
    if workdir:
        cfg["WorkingDir"] = workdir
    if user:
        cfg["User"] = user
    return json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
        "history": [{"created_by": "test"} for _ in layers],
    }, sort_keys=True).encode()


def write_oci_layout(dest: Path, layers: list[Layer], config: bytes, tag: str = "latest") -> str:
    """Write an OCI image layout at `dest`; return the manifest digest."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        d = sha(data)
        (blobs / d.split(":")[1]).write_bytes(data)
        return d

    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config), "size": len(config)},
        "layers": [{"mediaType": l.media_type, "digest": put(l.blob), "size": len(l.blob)}
                   for l in layers],
    }, sort_keys=True).encode()
    mdigest = put(manifest)
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (dest / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": mdigest, "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }))
    return mdigest


def skopeo_push_layout(layout: Path, dest_ref: str, tag: str = "latest") -> None:
    """Copy an OCI layout to a loopback registry with skopeo, byte for byte."""
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
         f"oci:{layout}:{tag}", f"docker://{dest_ref}"],
        check=True, capture_output=True,
    )


def push_image(registry_host: str, repo: str, layers: list[Layer], config: bytes,
               workdir: Path, tag: str = "latest") -> str:
    """Build an OCI layout of the image and push it with skopeo; return the manifest digest."""
    layout = workdir / f"layout-{repo.replace('/', '_')}-{tag}"
    digest = write_oci_layout(layout, layers, config, tag)
    skopeo_push_layout(layout, f"{registry_host}/{repo}:{tag}", tag)
    return digest
