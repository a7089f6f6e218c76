"""Containers: OCI runtime bundles, runc or crun, container records, volumes, the monitor,
the lifecycle of existing containers, `cp` and logs.

The names below are imported on first use, so that `ps` reads container records without
loading the rest.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # what the names are, for type checkers; at run time __getattr__ imports them
    from lazyoci.runtime.containers import ContainerRecord, ContainerStore
    from lazyoci.runtime.run import ContainerManager, RunOptions
    from lazyoci.runtime.volumes import MountRequest, Volume, VolumeStore

_WHERE = {
    "ContainerManager": "run", "RunOptions": "run", "ContainerRecord": "containers",
    "ContainerStore": "containers", "MountRequest": "volumes", "Volume": "volumes", "VolumeStore":
    "volumes",
}

__all__ = [
    "ContainerManager", "ContainerRecord", "ContainerStore", "MountRequest", "RunOptions", "Volume",
    "VolumeStore",
]


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
