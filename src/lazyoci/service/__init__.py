"""The lazyoci service: a daemon that hosts the FUSE mount of lazy layers (daemon, layers),
the session holder that keeps that mount across service processes (session_holder, holder_link),
and the client the CLI and the soci snapshotter use to start, stop and ask it (client)."""

from lazyoci.errors import ServiceError
from lazyoci.service.client import ServiceClient
from lazyoci.service.paths import ServicePaths

__all__ = ["ServiceClient", "ServiceError", "ServicePaths"]
