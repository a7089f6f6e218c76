"""SOCI indexes: build zTOCs and indexes (v1 with subject, v2 by conversion), push them,
and find them at run time. The formats are the reference snapshotter's, summarised in
docs/SOCI-FORMAT-NOTES.md."""

from lazyoci.soci.shortcuts import build_index_for_reference, build_ztoc, parse_ztoc
from lazyoci.soci.build import LayerZtoc, SociBuildOptions, SociIndexResult, build_index
from lazyoci.soci.convert import ConvertResult, convert
from lazyoci.soci.image_service_wiring import convert_local_image, index_local_image, index_remote_image
from lazyoci.soci.discovery import DiscoveredIndex, discover_index, fetch_artifacts
from lazyoci.soci.index import SociIndex, make_index, ztoc_descriptor
from lazyoci.soci.push import PushResult, push_index
from lazyoci.soci.remote import create_remote

__all__ = [
    "ConvertResult", "DiscoveredIndex", "LayerZtoc", "PushResult", "SociBuildOptions", "SociIndex",
    "SociIndexResult", "build_index", "build_index_for_reference", "build_ztoc", "convert", "convert_local_image",
    "create_remote", "discover_index", "fetch_artifacts", "index_local_image", "index_remote_image",
    "make_index", "parse_ztoc", "push_index", "ztoc_descriptor",
]
