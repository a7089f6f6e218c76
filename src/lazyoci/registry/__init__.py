"""The OCI distribution registry client: auth, credentials, blobs with Range, push, referrers.

The names below are imported on first use, so that `lazyoci.registry.options` (the settings,
which local commands build) does not bring in httpx and the client with it.
"""

import importlib

_WHERE = {
    "Challenge": "auth", "parse_challenges": "auth",
    "RegistryClient": "client",
    "Credentials": "credentials", "DockerConfig": "credentials", "config_key": "credentials",
    "registry_host": "credentials",
    "RegistryOptions": "options",
    "referrers_tag": "referrers",
}

__all__ = [
    "Challenge", "Credentials", "DockerConfig", "RegistryClient", "RegistryOptions",
    "config_key", "parse_challenges", "referrers_tag", "registry_host",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
