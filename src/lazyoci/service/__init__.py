"""The lazyoci service: a daemon that hosts the FUSE mount of lazy layers (daemon, layers),
the session holder that keeps that mount across service processes and answers READs of cached
spans itself (session_holder, holder_link, holder_reads, holder_offers),
and the client the CLI and the soci snapshotter use to start, stop and ask it (client).

The names below are loaded on first use: every process of the service (the holder, the daemon)
imports a submodule, and none of them needs the client's imports at its start."""

from __future__ import annotations

TYPE_CHECKING = False     # (not typing's: the holder never imports typing)
if TYPE_CHECKING:
    from typing import Any

    from lazyoci.errors import ServiceError
    from lazyoci.service.client import ServiceClient
    from lazyoci.service.paths import ServicePaths

__all__ = ["ServiceClient", "ServiceError", "ServicePaths"]


def __getattr__(name: str) -> Any:
    if name == "ServiceClient":
        from lazyoci.service.client import ServiceClient
        return ServiceClient
    if name == "ServiceError":
        from lazyoci.errors import ServiceError
        return ServiceError
    if name == "ServicePaths":
        from lazyoci.service.paths import ServicePaths
        return ServicePaths
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
