"""A streamed Range request's spans, each taken as its bytes arrive (fs/span_fetcher.py).

The span fetcher asks the layer server for a run of spans as a stream; this splits the
stream's pieces among the spans' receivers (`LayerIndex.span_receiver`), which hash and
decode them as they come, and hands each span on once its digest matched: the reader that
waits for the first span of a request does not wait for the last, nor for a whole span's
inflate after its last byte.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lazyoci.errors import IntegrityError, LazyociError
from lazyoci.fs.layer_index import LayerIndex, SpanReceiver

__all__ = ["RangeSink", "StreamedSpans"]

log = logging.getLogger("lazyoci.fs.span_fetcher")    # one log for a span's fetch, streamed or not

RangeSink = Callable[[bytes], object]     # takes a range's bytes as they arrive


class StreamedSpans:
    """The spans of one streamed request, taken as its bytes arrive (`fs/span_fetcher.py`).

    Each attempt of the request (`begin`) feeds the spans from the range's first byte: a span
    taken in an earlier attempt is skipped, one that failed its digest is judged again. Spans
    are in stream order and their compressed ranges go forward (a zTOC's may share one byte
    with the span before), so a span is complete once the bytes reach its end."""

    def __init__(self, index: LayerIndex, group: list[int], lo: int, layer_digest: str,
                 attempt: tuple[int, int], accept: Callable[[int, bytes], None]) -> None:
        self._index = index
        self._group = group
        self._bounds = [index.span_compressed_range(i) for i in group]
        self._lo = lo
        self._layer_digest = layer_digest
        self._attempt = attempt     # (this request's attempt, of how many) for the log
        self._accept = accept       # a span verified and decoded: to its readers and the cache
        self._receivers: dict[int, SpanReceiver] = {}
        self._next = 0              # the first span of the group not complete in this attempt
        self._pos = lo              # where the next byte of this attempt lies in the blob
        self.taken: set[int] = set()
        self.bad: list[int] = []
        self.error: LazyociError | None = None
        self.received = 0           # bytes of the last attempt

    def begin(self) -> RangeSink:
        self.close()
        self._next, self._pos, self.received = 0, self._lo, 0
        self.bad = []
        return self.feed

    def feed(self, piece: bytes) -> None:
        p = self._pos
        q = p + len(piece)
        self._pos = q
        self.received += len(piece)
        k = self._next
        while k < len(self._group):
            c0, c1 = self._bounds[k]
            if c0 >= q:
                break
            i = self._group[k]
            a, b = max(c0, p), min(c1, q)
            if a < b and i not in self.taken and self.error is None:
                receiver = self._receivers.get(i)
                if receiver is None:
                    receiver = self._receivers[i] = self._index.span_receiver(i)   # type: ignore[attr-defined]
                receiver.feed(piece if b - a == len(piece) else piece[a - p:b - p])
            if c1 > q:
                break
            self._complete(i)
            k += 1
            self._next = k

    def _complete(self, i: int) -> None:
        receiver = self._receivers.pop(i, None)
        if receiver is None:
            return
        try:
            data = receiver.finish()
        except IntegrityError as e:
            self.bad.append(i)
            log.error("layer %s span %d failed verification (attempt %d of %d): %s",
                      self._layer_digest, i, *self._attempt, e)
            return
        except LazyociError as e:
            self.error = e
            return
        self.taken.add(i)
        self._accept(i, data)

    def end(self) -> list[int]:
        """After the request's last byte: the spans that failed verification (with any the bytes
        never completed, which the request's own length check should have refused)."""
        self.close()
        return self.bad + [i for i in self._group if i not in self.taken and i not in self.bad]

    def close(self) -> None:
        for receiver in self._receivers.values():
            receiver.close()
        self._receivers.clear()
