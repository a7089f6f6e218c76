"""Build OCI image layouts for the benchmark without Docker.

A layer is made the way a Dockerfile step makes one: snapshot the root
filesystem's metadata, run the step, snapshot again, and tar what changed
(with `.wh.` whiteouts for what disappeared). Layers are gzip-compressed with
pigz (both cores) and written into an OCI image layout that skopeo can push.

A layer's tar ends right after its two end-of-archive blocks, as Go's archive/tar ends it (docker,
BuildKit, containerd, buildah), not padded to Python's 10 KiB records: skopeo's zstd:chunked
conversion keeps the image config's diff IDs but ends its stream there, so a padded layer no longer
decodes to its diff ID, and a runtime that downloads it whole refuses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

# Never part of a layer: kernel filesystems and the build's own scratch.
_SKIP_CONTENT = ("dev", "proc", "sys", "run", "tmp")

Signature = tuple


def snapshot(root: Path) -> dict[str, Signature]:
    """Path -> metadata signature. ctime and inode change on any write or rename,
    so a changed signature means the step touched the entry."""
    out: dict[str, Signature] = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = sorted(dirnames)
            rel_dir = ""
        names = dirnames + filenames
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            st = os.lstat(os.path.join(dirpath, name))
            link = os.readlink(os.path.join(dirpath, name)) if stat.S_ISLNK(st.st_mode) else ""
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                        st.st_ctime_ns, st.st_ino, link)
        # don't descend into kernel filesystems / scratch; keep the directories themselves
        if rel_dir == "":
            dirnames[:] = [d for d in dirnames if d not in _SKIP_CONTENT]
    return out


@dataclass
class LayerBlob:
    digest: str        # sha256 of the gzip blob
    diff_id: str       # sha256 of the uncompressed tar
    size: int
    tar_size: int
    comment: str


class _HashingWriter(io.RawIOBase):
    """Hash and count the tar stream on its way to pigz; once `end` is set, what comes past it (the
    record padding Python's tarfile writes at its close) is dropped."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.h = hashlib.sha256()
        self.n = 0
        self.end: int | None = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        size = len(b)
        b = bytes(b) if self.end is None else bytes(b)[:max(self.end - self.n, 0)]
        self.h.update(b)
        self.n += len(b)
        self.sink.write(b)
        return size


@dataclass
class Layout:
    """An OCI image layout being written under `path`."""

    path: Path
    layers: list[LayerBlob] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.path / "blobs/sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def _put_bytes(self, data: bytes) -> str:
        d = hashlib.sha256(data).hexdigest()
        (self.path / "blobs/sha256" / d).write_bytes(data)
        return "sha256:" + d

    def add_layer(self, write_tar, comment: str) -> LayerBlob:
        """`write_tar(tarfile.TarFile)` adds the entries; returns the stored blob."""
        tmp = self.path / "blobs/layer.tmp"
        t0 = time.monotonic()
        with open(tmp, "wb") as out:
            pigz = subprocess.Popen(["pigz", "-6", "-n", "-c"], stdin=subprocess.PIPE, stdout=out)
            hw = _HashingWriter(pigz.stdin)
            with tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT,
                              bufsize=1 << 20) as tf:
                write_tar(tf)
                hw.end = tf.offset + 2 * tarfile.BLOCKSIZE      # the end-of-archive blocks, no padding
            pigz.stdin.close()
            if pigz.wait() != 0:
                raise RuntimeError("pigz failed")
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        digest = "sha256:" + h.hexdigest()
        size = tmp.stat().st_size
        tmp.rename(self.path / "blobs/sha256" / h.hexdigest())
        blob = LayerBlob(digest, "sha256:" + hw.h.hexdigest(), size, hw.n, comment)
        self.layers.append(blob)
        print(f"  layer {comment}: tar {hw.n / 2**20:.1f} MiB -> gzip {size / 2**20:.1f} MiB "
              f"({time.monotonic() - t0:.1f}s)", flush=True)
        return blob

    def finish(self, cmd: list[str], env: list[str] | None = None, workdir: str = "/",
               tag: str = "latest") -> str:
        """Write config, manifest and index.json; returns the manifest digest."""
        created = "2026-01-01T00:00:00Z"
        config = {
            "created": created,
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": cmd, "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                       "WorkingDir": workdir},
            "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in self.layers]},
            "history": [{"created": created, "created_by": l.comment} for l in self.layers],
        }
        raw_config = json.dumps(config, separators=(",", ":")).encode()
        cfg_digest = self._put_bytes(raw_config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": len(raw_config)},
            "layers": [{"mediaType": LAYER_GZIP, "digest": l.digest, "size": l.size} for l in self.layers],
        }
        raw_manifest = json.dumps(manifest, separators=(",", ":")).encode()
        m_digest = self._put_bytes(raw_manifest)
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": m_digest, "size": len(raw_manifest),
                           "platform": {"architecture": "amd64", "os": "linux"},
                           "annotations": {"org.opencontainers.image.ref.name": tag}}],
        }
        (self.path / "index.json").write_text(json.dumps(index))
        return m_digest


def tar_changes(root: Path, before: dict[str, Signature], after: dict[str, Signature]):
    """A `write_tar` callback for the entries that changed between two snapshots."""
    root = Path(root)
    changed_set = {p for p, sig in after.items() if before.get(p) != sig}
    deleted = sorted(p for p in before if p not in after)
    # a deleted directory needs one whiteout, not one per child
    top_deleted: list[str] = []
    for p in deleted:
        if not any(p.startswith(d + "/") for d in top_deleted[-1:]):
            top_deleted.append(p)
    # every changed path and whiteout comes with its parent directories, as docker, BuildKit and
    # containerd diffs do (other tools trip on a file whose directory the layer does not have)
    for p in list(changed_set) + top_deleted:
        parts = p.split("/")[:-1]
        for n in range(1, len(parts) + 1):
            parent = "/".join(parts[:n])
            if parent in after:
                changed_set.add(parent)
    changed = sorted(changed_set)
    def write(tf: tarfile.TarFile) -> None:
        for p in top_deleted:
            parent, _, name = p.rpartition("/")
            ti = tarfile.TarInfo((parent + "/" if parent else "") + ".wh." + name)
            ti.mtime = 0
            tf.addfile(ti)
        for p in changed:
            tf.add(root / p, arcname=p, recursive=False)

    return write


def tar_tree(root: Path):
    """A `write_tar` callback for a whole directory tree (sorted, deterministic order)."""
    root = Path(root)

    def write(tf: tarfile.TarFile) -> None:
        for p in sorted(snapshot(root)):
            tf.add(root / p, arcname=p, recursive=False)

    return write


def fresh_dir(path: Path) -> Path:
    """`path`, emptied of what an earlier (maybe interrupted) build left there."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def busybox_tree(dest: Path, applets: tuple[str, ...] = ("sh", "cat", "xargs", "echo", "head", "ls",
                                                         "sleep", "wc", "true", "env")) -> None:
    """A minimal runtime: Debian's static busybox at /bin/busybox plus applet symlinks."""
    src = Path("/bin/busybox")
    if not src.exists():
        raise SystemExit("busybox-static is not installed (apt-get install busybox-static)")
    (dest / "bin").mkdir(parents=True, exist_ok=True)
    for d in ("etc", "tmp", "proc", "sys", "dev", "root"):
        (dest / d).mkdir(exist_ok=True)
    (dest / "bin/busybox").write_bytes(src.read_bytes())
    os.chmod(dest / "bin/busybox", 0o755)
    for a in applets:
        link = dest / "bin" / a
        if not link.is_symlink():
            link.symlink_to("busybox")
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc/group").write_text("root:x:0:\n")
