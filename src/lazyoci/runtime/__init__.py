"""Containers: OCI runtime bundles, runc or crun, container records, volumes, the monitor,
the lifecycle of existing containers, `cp` and logs.

The names below are imported on first use, so that `ps` reads container records without
loading the rest.
"""

from typing import TYPE_CHECKING

from lazyoci.lazy_names import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
