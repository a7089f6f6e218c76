"""Image operations over the store and the registry: pull, push, tag, rmi, save, load, import.

The names below are imported on first use, so that a command that only reads local records
does not bring in the registry client with them.
"""

from typing import TYPE_CHECKING

from lazyoci.lazy_names import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
