"""The OCI model: references, media types, digests, descriptors, manifests, platforms.

The names below load their module on first use, so a command that needs only a
reference (`ps --filter ancestor=...`) imports neither manifests nor OpenSSL's hashing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lazyoci.oci.digest import Digest, DigestVerifier, sha256_digest, verify_bytes
    from lazyoci.oci.manifest import Descriptor, ImageConfig, Index, Manifest, chain_ids, parse_any
    from lazyoci.oci.platform import Platform
    from lazyoci.oci.reference import Reference

_MODULE_OF = {
    "Digest": "digest", "DigestVerifier": "digest", "sha256_digest": "digest", "verify_bytes": "digest",
    "Descriptor": "manifest", "ImageConfig": "manifest", "Index": "manifest", "Manifest": "manifest",
    "chain_ids": "manifest", "parse_any": "manifest",
    "Platform": "platform",
    "Reference": "reference",
}

__all__ = [
    "Descriptor", "Digest", "DigestVerifier", "ImageConfig", "Index", "Manifest",
    "Platform", "Reference", "chain_ids", "parse_any", "sha256_digest", "verify_bytes",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
