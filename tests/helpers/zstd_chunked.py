"""zstd:chunked images made by a real producer: Debian's skopeo (containers/storage's compressor).

    layout = chunked_layout(src_layout, workdir)          # an OCI layout whose layers are zstd:chunked
    push_chunked(src_layout, f"{registry.host}/repo:tag")  # the same, into a registry

Both start from an OCI layout the tests built (helpers/images.py, helpers/tricky_image.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

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
