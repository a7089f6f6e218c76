"""zstd:chunked layers (containers/storage, podman, skopeo, buildah) served lazily through their own TOC.

`annotations.py` finds the TOC from the layer's annotations, `toc.py` parses and
checks it into a layer index (fs/layer_index.py), `fetch.py` fetches and verifies
it at pull time.
"""

from lazyoci.zstdchunked.annotations import TocLocation, toc_location
from lazyoci.zstdchunked.fetch import ChunkedToc, fetch_toc, is_chunked_layer
from lazyoci.zstdchunked.toc import ChunkedEntry, ZstdChunkedToc, is_chunked_toc

__all__ = ["ChunkedEntry", "ChunkedToc", "TocLocation", "ZstdChunkedToc", "fetch_toc", "is_chunked_layer",
           "is_chunked_toc", "toc_location"]
