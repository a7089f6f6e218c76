"""The OCI model: references, media types, digests, descriptors, manifests, platforms."""

from lazyoci.oci.digest import Digest, DigestVerifier, sha256_digest, verify_bytes
from lazyoci.oci.manifest import Descriptor, ImageConfig, Index, Manifest, chain_ids, parse_any
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference

__all__ = [
    "Descriptor", "Digest", "DigestVerifier", "ImageConfig", "Index", "Manifest",
    "Platform", "Reference", "chain_ids", "parse_any", "sha256_digest", "verify_bytes",
]
