"""Prefetch at mount: the files a layer's own index marks to be fetched before any read.

eStargz marks them with `.prefetch.landmark`: the files before it in the layer are
the ones its producer saw a workload read first (`ctr-remote images optimize`). Their
spans are fetched once the view is mounted, in a thread, in one Range request for the
whole region, as stargz-snapshotter fetches it: no bound on the number of spans, only the
span fetcher's memory bound (MAX_REQUEST_BYTES of compressed and inflated bytes held per
request; a larger region takes more requests). They go through the span fetcher, so each
is verified and cached, and a read that needs one meanwhile waits for it, not for a second
fetch. `.no.prefetch.landmark`, or no landmark, means nothing is prefetched.
"""

from __future__ import annotations

import logging
import threading

from lazyoci.errors import LazyociError
from lazyoci.fs.layer_index import LayerIndex
from lazyoci.fs.span_fetcher import SpanFetcher
from lazyoci.libc import name_this_thread

__all__ = ["prefetch_files"]

log = logging.getLogger(__name__)


def prefetch_files(index: LayerIndex, fetcher: SpanFetcher, layer_digest: str) -> threading.Thread | None:
    """Start fetching the stream bytes the index asks to prefetch (its `prefetch_bytes`, 0 for
    formats without the notion); returns the thread, or None when there is nothing to fetch."""
    size = int(getattr(index, "prefetch_bytes", 0))
    spans = index.spans_for(0, size)
    if not spans or all(fetcher.cache.has(i) for i in spans):
        return None

    def run() -> None:
        name_this_thread()
        try:
            fetcher.ensure(spans, background=True, longest=len(spans))
            log.info("layer %s: prefetched %d spans (%d bytes of files before the prefetch landmark)",
                     layer_digest, len(spans), size)
        except LazyociError as e:     # only a prefetch: a read that needs those bytes reports it
            log.warning("layer %s: prefetch failed: %s", layer_digest, e)

    thread = threading.Thread(target=run, name="prefetch", daemon=True)
    thread.start()
    return thread
