"""The OCI distribution registry client: auth, credentials, blobs with Range, push, referrers."""

from lazyoci.registry.auth import Challenge, parse_challenges
from lazyoci.registry.client import RegistryClient
from lazyoci.registry.credentials import Credentials, DockerConfig, config_key, registry_host
from lazyoci.registry.options import RegistryOptions
from lazyoci.registry.referrers import referrers_tag

__all__ = [
    "Challenge", "Credentials", "DockerConfig", "RegistryClient", "RegistryOptions",
    "config_key", "parse_challenges", "referrers_tag", "registry_host",
]
