"""Check that a lazyoci data root is consistent: no half blob, no orphan, every blob verifies."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import tarfile
from pathlib import Path


def assert_store_consistent(root: Path, allow_unreferenced: bool = False,
                            allow_partial_files: bool = False) -> None:
    tmp = root / "tmp"
    leftovers = list(tmp.iterdir()) if tmp.exists() else []
    assert allow_partial_files or leftovers == [], f"half-written files left in {tmp}: {leftovers}"
    blobs_dir = root / "blobs" / "sha256"
    on_disk = {f"sha256:{p.name}": p for p in blobs_dir.iterdir()} if blobs_dir.exists() else {}
    for digest, path in on_disk.items():
        actual = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        assert actual == digest, f"blob {digest} holds bytes of {actual}"
    db = root / "lazyoci.db"
    if not db.exists():
        assert not on_disk
        return
    conn = sqlite3.connect(db)
    try:
        leases = conn.execute("SELECT count(*) FROM leases").fetchone()[0]
        assert leases == 0, "a lease was left behind"
        referenced = {r[0] for r in conn.execute("SELECT digest FROM blob_refs")}
        named = {r[0] for r in conn.execute("SELECT digest FROM image_names")}
        contents = {r[0] for r in conn.execute("SELECT digest FROM image_contents")}
    finally:
        conn.close()
    assert named <= contents, f"names point at missing images: {named - contents}"
    if not allow_unreferenced:
        orphans = set(on_disk) - referenced
        assert not orphans, f"orphan blobs nothing references: {orphans}"


def umoci_image(layout: Path, tag: str, files: list[dict[str, bytes]], cmd: str = "/bin/true") -> None:
    """Build an image with umoci (an independent tool): one layer per dict of path -> bytes."""
    def run(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True)
    if not layout.exists():
        run("init", "--layout", str(layout))
    run("new", "--image", f"{layout}:{tag}")
    bundle = layout.parent / f"bundle-{tag}"
    for i, layer in enumerate(files):
        run("unpack", "--image", f"{layout}:{tag}", str(bundle))
        for rel, data in layer.items():
            p = bundle / "rootfs" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        run("repack", "--image", f"{layout}:{tag}", str(bundle))
        subprocess.run(["rm", "-rf", str(bundle)], check=True)
    run("config", "--image", f"{layout}:{tag}", "--config.cmd", cmd)


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
