"""Image operations over the store and the registry: pull, push, tag, rmi, save, load, import.

The names below are imported on first use, so that a command that only reads local records
does not bring in the registry client with them.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # what the names are, for type checkers; at run time __getattr__ imports them
    from lazyoci.images.progress import ProgressEvent, ProgressSink, no_progress
    from lazyoci.images.pull import PullHooks, PullResult
    from lazyoci.images.service import ImageService, ImageSummary, LayerConsumer, LocalImage, RemoveResult

_WHERE = {
    "ImageService": "service", "LocalImage": "service", "ImageSummary": "service", "RemoveResult":
    "service", "LayerConsumer": "service", "PullHooks": "pull", "PullResult": "pull",
    "ProgressEvent": "progress", "ProgressSink": "progress", "no_progress": "progress",
}

__all__ = [
    "ImageService", "ImageSummary", "LayerConsumer", "LocalImage", "ProgressEvent", "ProgressSink",
    "PullHooks", "PullResult", "RemoveResult", "no_progress",
]


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
