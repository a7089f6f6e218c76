"""The OCI model: references, media types, digests, descriptors, manifests, platforms.

The names below are imported on first use, so that a command that needs only a reference
(`ps --filter ancestor=...`) imports neither manifests nor OpenSSL's hashing.
"""

from typing import TYPE_CHECKING

from lazyoci.lazy_names import lazy_names

if TYPE_CHECKING:   # what the names are, for type checkers; at run time __getattr__ imports them
    from lazyoci.oci.digest import Digest, DigestVerifier, sha256_digest, verify_bytes
    from lazyoci.oci.manifest import Descriptor, ImageConfig, Index, Manifest, chain_ids, parse_any
    from lazyoci.oci.platform import Platform
    from lazyoci.oci.reference import Reference

_WHERE = {
    "Digest": "digest", "DigestVerifier": "digest", "sha256_digest": "digest", "verify_bytes": "digest",
    "Descriptor": "manifest", "ImageConfig": "manifest", "Index": "manifest", "Manifest": "manifest",
    "chain_ids": "manifest", "parse_any": "manifest", "Platform": "platform", "Reference": "reference",
}

__all__ = [
    "Descriptor", "Digest", "DigestVerifier", "ImageConfig", "Index", "Manifest",
    "Platform", "Reference", "chain_ids", "parse_any", "sha256_digest", "verify_bytes",
]


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
