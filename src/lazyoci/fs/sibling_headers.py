"""Header checks ahead of lookups: once a workload scans a tree, a lookup that waits for the
network also fetches the spans holding the tar headers of its siblings.

An interpreter importing a package looks one module up after another, and each lookup waits
for its entry's tar header check (fs/header_check.py): when the header's span is not cached,
that is a round trip and a span's transfer, and the next lookup does not start before it
ends. On the python-ml image (`import torch`) such checks came one after another for seven
of the start's twelve seconds. The next lookups are mostly of the same directory's other
entries (the package's modules and subpackages), whose headers lie in spans a tar keeps
together or at the starts of the subdirectories' runs. So after a check of an entry of
directory D had to fetch, the spans holding the headers of D's other entries (and of the
entry's own, if it is a directory: it is looked up to look inside it) are queued on the span
manager's read-ahead threads (SpanFetcher.fetch_ahead), nearest the missed span first, once
per directory and layer. Among large files a header costs a span of file data, so spans
holding fewer than MIN_HEADERS entries' headers are left to the lookups that need them, and
one directory brings at most MAX_AHEAD_BYTES, and at most AHEAD_PER_MISS spans for each span
the scan's own checks had to fetch lately: a guess never costs much more than the evidence for
it. A package's directory is mostly looked up whole, but a directory of packages (node_modules,
a few of a thousand wanted) would bring most of the layer for a handful of lookups. They go
after the missed span has arrived and been checked, so they never share the link with it, and
through the span manager, so each is verified and fetched once, and a lookup that needs one
still in flight waits for it rather than fetching it again.

In a view with a recorded prefetch, a miss on the recorded path (the workload got ahead of the
prefetch) fetches ahead only headers in spans the recording names: the others are of siblings the
recorded run never looked up, and in a layout around recorded reads (soci/recorded_spans.py)
they sit in long spans of data no read wants.

Only a scan pays for this: on the python3 image's small start (its checks fetch eight spans,
for one directory of the standard library) it would move 10 MB more to save about 0.4 s
(a replay of the start's trace). Speculation starts
once header checks have had to fetch SCAN_MISSES different spans within SCAN_WINDOW seconds,
counted across every layer of the service: overlayfs looks a name up in each layer of an
image in turn, so one workload's scan spreads its misses over the image's layers.
bench/README.md has the figures.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from lazyoci.fs.header_check import LayerVerifier
from lazyoci.fs.span_fetcher import SpanFetcher
from lazyoci.fs.tree import DIR, LayerTree

log = logging.getLogger(__name__)

SCAN_MISSES = 12           # spans header checks had to fetch ...
SCAN_WINDOW = 10.0         # ... within this many seconds: a workload scanning a tree
MAX_SIBLINGS = 4096        # entries of one directory looked at (the rest are not fetched ahead)
FIRST_HEADERS = 16         # the first span is fetched at mount if it holds this many entries' headers
MIN_HEADERS = 4            # a span holding fewer entries' headers is not fetched ahead ...
MAX_AHEAD_BYTES = 64 << 20  # ... nor more than this many compressed bytes for one directory,
AHEAD_PER_MISS = 2         # ... nor more spans than this many per span the scan's checks fetched


class SiblingHeaders:
    """The scan gate and the directories already fetched ahead, for every layer of a service."""

    def __init__(self, scan_misses: int = SCAN_MISSES, window: float = SCAN_WINDOW,
                 clock: Callable[[], float] = time.monotonic, ahead_per_miss: int = AHEAD_PER_MISS) -> None:
        self.scan_misses = scan_misses
        self.window = window
        self.ahead_per_miss = ahead_per_miss
        self._clock = clock
        # (index digest, span) -> when a check last had to fetch it
        self._misses: dict[tuple[str, int], float] = {}
        self._done: set[tuple[str, int]] = set()       # (the layer's index digest, directory node)
        self._lock = threading.Lock()

    def missed(self, tree: LayerTree, verifier: LayerVerifier, fetcher: SpanFetcher, n: int) -> int:
        """Note that node n's header check had to fetch; if a scan is on and n's directory was
        not fetched ahead yet, queue the spans of its other entries' headers. Returns how many
        spans were queued (call from a worker thread: it decodes the siblings' entries)."""
        own = tree.entry[n]
        near = tree.index.spans_for(*_header_end(tree, own)).start if own >= 0 else 0
        # n's directory, and n itself if it is one: a directory is looked up to look inside it
        dirs = ([tree.parent[n]] if n > 0 else []) + ([n] if tree.kind[n] == DIR else [])
        now = self._clock()
        with self._lock:
            misses = self._misses
            misses[(tree.index.digest, near)] = now          # a span many lookups waited for counts once
            if len(misses) >= self.scan_misses:
                for key in [k for k, at in misses.items() if at < now - self.window]:
                    del misses[key]
            if len(misses) < self.scan_misses:
                return 0
            dirs = [d for d in dirs if (tree.index.digest, d) not in self._done]
            if not dirs:
                return 0
            self._done.update((tree.index.digest, d) for d in dirs)
            most_spans = self.ahead_per_miss * len(misses)
        entries: list[int] = []
        for d in dirs:
            for _, c in tree.list(d):
                if len(entries) >= MAX_SIBLINGS:
                    break
                if c != n and tree.entry[c] >= 0:
                    entries.append(tree.entry[c])
        spans = verifier.header_spans(entries)
        spans.sort(key=lambda s: (s < near, abs(s - near)))      # onwards first, then back
        queued = fetcher.fetch_ahead(spans, MIN_HEADERS, MAX_AHEAD_BYTES, after=near, most_spans=most_spans)
        log.debug("layer %s: %d spans of the headers in %s fetched ahead (%d header checks fetched lately)",
                  fetcher.layer_digest[7:19], queued,
                  ", ".join(tree.name(d).decode(errors="replace") or "/" for d in dirs), len(misses))
        return queued

    def forget(self, index_digest: str) -> None:
        """Drop what is known of the directories of a layer seen through this index (unmounted)."""
        with self._lock:
            self._done = {k for k in self._done if k[0] != index_digest}
            self._misses = {k: at for k, at in self._misses.items() if k[0] != index_digest}


def fetch_first_headers(fetcher: SpanFetcher) -> int:
    """At mount, without a recorded prefetch: fetch the layer's first span ahead if it holds the
    headers of at least FIRST_HEADERS entries. A tar begins with the directories the rest lies
    under (a layer of packages: usr/, usr/local/, ... site-packages/), which every lookup into
    the layer checks first: on the python-ml image the first four requests of a start, one after
    another, were the first spans of its four layers. A layer of a few large files (a data
    layer) is left alone. Returns how many spans were queued (0 or 1)."""
    return fetcher.fetch_ahead([0], min_headers=FIRST_HEADERS)


def _header_end(tree: LayerTree, i: int) -> tuple[int, int]:
    """The last byte of entry i's header (just before its data) as a range of the tar stream."""
    offset, _ = tree.index.entry_extent(i)
    return max(offset - 1, 0), max(offset, 1)
