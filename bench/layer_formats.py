"""The bench images in the two other lazy formats, made by their real producers.

eStargz: `ctr-remote images convert --estargz --oci` in a containerd of its own
(tests/helpers/estargz.py, as the tests make theirs). zstd:chunked: `skopeo copy
--dest-compress-format zstd:chunked` (tests/helpers/zstd_chunked.py's flags). Each copy goes
to the same registry as `<repo>-<mode>`, so it has no SOCI index: a lazy run of it reads the
layers' own TOCs. skopeo recompresses into a layout of its own, which is then pushed as it is:
copying straight to the registry, it mounts the gzip blobs already there instead.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.estargz import convert, converter, fetch_manifest  # noqa: E402
from helpers.zstd_chunked import chunked_layout  # noqa: E402


def repo_of(ref: str, mode: str) -> str:
    """The reference a mode runs: `host/bench/x:latest` -> `host/bench/x-estargz:latest`."""
    if mode not in CONVERTERS:
        return ref
    name, tag = ref.rsplit(":", 1)
    return f"{name}-{mode}:{tag}"


def _layer_bytes(host: str, repo: str) -> int:
    return sum(layer["size"] for layer in fetch_manifest(host, repo)["layers"])


def to_estargz(host: str, repo: str, layout: Path) -> int:
    """Convert `host/repo` (tag latest) to eStargz; returns the converted layers' bytes."""
    name = repo.rsplit(":", 1)[0]
    with converter() as cd:
        convert(cd, host, name, f"{name}-estargz")
    return _layer_bytes(host, f"{name}-estargz")


def to_zstd_chunked(host: str, repo: str, layout: Path) -> int:
    """Push `layout` (tag latest) recompressed as zstd:chunked next to `host/repo`; returns the
    converted layers' bytes."""
    name = repo.rsplit(":", 1)[0]
    with tempfile.TemporaryDirectory(prefix="zstd-chunked-", dir=layout.parent) as tmp:
        chunked = chunked_layout(layout, Path(tmp) / "layout")
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{chunked}:latest",
                        f"docker://{host}/{name}-zstd-chunked:latest"], check=True, capture_output=True,
                       timeout=1800)
    return _layer_bytes(host, f"{name}-zstd-chunked")


CONVERTERS: dict[str, Callable[[str, str, Path], int]] = {"estargz": to_estargz, "zstd-chunked": to_zstd_chunked}
