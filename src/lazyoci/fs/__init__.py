"""The lazy layer filesystem: a compact tree from the layer's index (tree, over the protocol of
layer_index, which a zTOC implements), verified spans fetched on demand (span_fetcher) and
cached on disk (span_cache), the background fetcher, and the pyfuse3 operations that show
every lazy layer as a directory of one mount (layer_fs)."""

from lazyoci.fs.background import BackgroundFetcher
from lazyoci.fs.layer_index import IndexEntry, LayerIndex
from lazyoci.fs.span_cache import LayerCache, SpanCache
from lazyoci.fs.span_fetcher import SpanFetcher
from lazyoci.fs.tree import LayerTree

__all__ = ["BackgroundFetcher", "IndexEntry", "LayerCache", "LayerIndex", "LayerTree", "SpanCache",
           "SpanFetcher"]
