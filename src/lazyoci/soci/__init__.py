"""SOCI indexes: build zTOCs and indexes (v1 with subject, v2 by conversion), push them,
and find them at run time. The formats are the reference snapshotter's, summarised in
docs/SOCI-FORMAT-NOTES.md.

The names below are imported on first use, so that a lazy pull, which only discovers an
index, does not bring in the builder and the converter with it.
"""

from typing import TYPE_CHECKING

from lazyoci.lazy_names import lazy_names

if TYPE_CHECKING:   # what the names are, for type checkers; at run time __getattr__ imports them
    from lazyoci.soci.build import LayerZtoc, SociBuildOptions, SociIndexResult, build_index
    from lazyoci.soci.convert import ConvertResult, convert
    from lazyoci.soci.discovery import DiscoveredIndex, discover_index, fetch_artifacts
    from lazyoci.soci.image_service_wiring import convert_local_image, index_local_image, index_remote_image
    from lazyoci.soci.index import SociIndex, make_index, ztoc_descriptor
    from lazyoci.soci.push import PushResult, push_index
    from lazyoci.soci.remote import create_remote
    from lazyoci.soci.shortcuts import build_index_for_reference, build_ztoc, parse_ztoc

_WHERE = {
    "build_index_for_reference": "shortcuts", "build_ztoc": "shortcuts", "parse_ztoc": "shortcuts",
    "LayerZtoc": "build", "SociBuildOptions": "build", "SociIndexResult": "build", "build_index": "build",
    "ConvertResult": "convert", "convert": "convert",
    "convert_local_image": "image_service_wiring", "index_local_image": "image_service_wiring",
    "index_remote_image": "image_service_wiring",
    "DiscoveredIndex": "discovery", "discover_index": "discovery", "fetch_artifacts": "discovery",
    "SociIndex": "index", "make_index": "index", "ztoc_descriptor": "index",
    "PushResult": "push", "push_index": "push", "create_remote": "remote",
}

__all__ = [
    "ConvertResult", "DiscoveredIndex", "LayerZtoc", "PushResult", "SociBuildOptions", "SociIndex",
    "SociIndexResult", "build_index", "build_index_for_reference", "build_ztoc", "convert", "convert_local_image",
    "create_remote", "discover_index", "fetch_artifacts", "index_local_image", "index_remote_image",
    "make_index", "parse_ztoc", "push_index", "ztoc_descriptor",
]


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
