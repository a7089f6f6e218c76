"""zstd:chunked images made by real producers: Debian's skopeo and podman (containers/storage's compressor).

    layout = chunked_layout(src_layout, workdir)          # an OCI layout whose layers are zstd:chunked
    push_chunked(src_layout, f"{registry.host}/repo:tag")  # the same, into a registry
    podman_push_chunked(src_layout, f"{registry.host}/repo:tag", workdir)   # through podman's own store

Both start from an OCI layout the tests built (helpers/images.py, helpers/tricky_image.py).

Two things of skopeo 1.9 the layouts here allow for:
- its zstd:chunked stream ends right after the tar's end-of-archive blocks, while it keeps the
  image config's diff IDs: a tar padded further (Python's tarfile pads to 10 KiB records) would
  no longer match its diff ID once decoded, so layers here end as Go's archive/tar ends them
  (`go_layer`), as those of buildah and podman do;
- its blob info cache (kept by the machine, not by a test) reuses a zstd blob already in the
  registry under another repository and then drops the zstd:chunked annotations, so every image
  here holds a file of its own random bytes (`nonce`).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

from helpers.images import Entry, Layer, make_layer, tar_bytes, write_oci_layout

CHUNKED = ["--dest-compress", "--dest-compress-format", "zstd:chunked"]


def push_chunked(layout: Path, dest_ref: str, tag: str = "latest") -> None:
    """Copy an OCI layout to a loopback registry, every layer recompressed as zstd:chunked."""
    subprocess.run(["skopeo", "copy", "--quiet", *CHUNKED, "--dest-tls-verify=false",
                    f"oci:{layout}:{tag}", f"docker://{dest_ref}"], check=True, capture_output=True)


def chunked_layout(layout: Path, dest: Path, tag: str = "latest") -> Path:
    """Copy an OCI layout to another layout at `dest`, every layer recompressed as zstd:chunked."""
    subprocess.run(["skopeo", "copy", "--quiet", *CHUNKED, f"oci:{layout}:{tag}", f"oci:{dest}:{tag}"],
                   check=True, capture_output=True)
    return dest


def layout_manifest(layout: Path) -> dict:
    """The (single) image manifest of an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    return json.loads(blob(layout, index["manifests"][0]["digest"]))


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def nonce(name: str = "nonce") -> Entry:
    """A file no other image holds (see the module docstring)."""
    return Entry(f"{name}-{os.urandom(8).hex()}", data=os.urandom(64))


def go_layer(entries: list[Entry], format: int = tarfile.PAX_FORMAT) -> Layer:
    """An uncompressed layer of `entries` that ends after its two end-of-archive blocks, as Go writes."""
    raw = tar_bytes(entries, format=format)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        tf.getmembers()
        end = tf.offset + 1024
    assert not raw[end:].strip(b"\0")
    return make_layer(raw[:end], "none")


def tricky_go_image(workdir: Path):
    """The tricky image (helpers/tricky_image.py) with Go-style layer ends and a nonce file per layer."""
    from helpers.tricky_image import TrickyImage, layer1_entries, layer2_entries, layer3_entries, tricky_config

    layers = [go_layer(layer1_entries() + [nonce()]), go_layer(layer2_entries() + [nonce()]),
              go_layer(layer3_entries() + [nonce()], format=tarfile.GNU_FORMAT)]
    config = tricky_config(layers)
    layout = workdir / "tricky-go-layout"
    digest = write_oci_layout(layout, layers, config)
    return TrickyImage(layout, layers, config, digest)


def podman_push_chunked(layout: Path, dest_ref: str, workdir: Path, tag: str = "latest") -> None:
    """Load an OCI layout into a podman store of its own (vfs, under `workdir`), then
    `podman push --compression-format zstd:chunked` it to a loopback registry. podman refuses a
    run root longer than 50 characters, so that one is a short temporary directory."""
    import shutil
    import tempfile

    run_root = tempfile.mkdtemp(prefix="lazyoci-podman-")
    podman = ["podman", "--root", str(workdir / "podman-root"), "--runroot", run_root,
              "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none"]
    try:
        pulled = subprocess.run([*podman, "pull", "--quiet", f"oci:{layout}:{tag}"], check=True,
                                capture_output=True, text=True)
        image_id = pulled.stdout.strip().splitlines()[-1]
        subprocess.run([*podman, "push", "--quiet", "--compression-format", "zstd:chunked", "--tls-verify=false",
                        image_id, f"docker://{dest_ref}"], check=True, capture_output=True)
    finally:
        subprocess.run([*podman, "rmi", "--all", "--force"], check=False, capture_output=True)
        shutil.rmtree(run_root, ignore_errors=True)
