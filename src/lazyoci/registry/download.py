"""Blob downloads: verified streams that resume after resets, and Range reads for lazy loading
(one range, or several in one request where the registry serves them).

Both run under a `TransferGuard` (registry/transfer.py): whole blobs with the
options' `blob_limits` (a minimum rate, no deadline), Range reads with its
`range_limits` (a deadline for the read, retries included, and a minimum rate).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import httpx

from lazyoci.errors import IntegrityError, RangeNotSupportedError, RegistryError
from lazyoci.oci.digest import Digest, DigestVerifier
from lazyoci.oci.reference import Reference
from lazyoci.registry.auth import pull_scope
from lazyoci.registry.transfer import TransferGuard
from lazyoci.registry.transport import Transport, backoff, describe, raise_for_status

log = logging.getLogger(__name__)

RangeSink = Callable[[bytes], object]   # takes a range's bytes as they arrive (stream_range)

# Blobs are sent as stored; asking for identity keeps byte offsets (Range) meaningful.
_IDENTITY = {"Accept-Encoding": "identity"}


def blob_path(ref: Reference, digest: str) -> str:
    Digest.parse(digest)
    return f"/v2/{ref.repository}/blobs/{digest}"


def iter_blob(transport: Transport, ref: Reference, digest: str, size: int | None = None) -> Iterator[bytes]:
    """Stream a blob, resuming with `Range: bytes=N-` after a connection drops mid-body.

    Every byte yielded is hashed; size and digest are checked after the last chunk, so a
    consumer must not commit anything before the iterator is exhausted without error."""
    verifier = DigestVerifier(digest, size, what=f"blob {digest}")
    path = blob_path(ref, digest)
    scopes = (pull_scope(ref.repository),)
    with transport.transfer(transport.options.blob_limits, f"blob {digest} of {ref.name}") as guard:
        offset = 0
        failures = 0   # consecutive attempts that ended in a reset without any new byte, or stalled
        while True:
            headers = dict(_IDENTITY)
            if offset:
                headers["Range"] = f"bytes={offset}-"
            _, resp = transport.send(ref.registry, "GET", path, scopes=scopes, headers=headers,
                                     stream=True, mirrors=True, guard=guard)
            start_offset = offset
            try:
                raise_for_status(resp, f"blob {digest} of {ref.name}")
                skip = 0
                if offset and resp.status_code == 206:
                    _check_content_range(resp, offset, digest)
                elif offset:
                    skip = offset   # the server ignored Range on resume: drop what we already have
                try:
                    # Unbuffered: every byte received is yielded before a reset can lose it.
                    for chunk in _guarded(transport, resp, guard, resp.iter_raw()):
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk, skip = chunk[skip:], 0
                        verifier.update(chunk)
                        offset += len(chunk)
                        yield chunk
                except httpx.TransportError as e:
                    # A trickle is no progress: a registry that stalls every attempt ends the pull.
                    stalled = isinstance(e, httpx.TimeoutException)
                    failures = failures + 1 if (offset == start_offset or stalled) else 1
                    why = guard.explain(e) or describe(e)
                    if failures > max(transport.options.max_retries, 1):
                        raise RegistryError(f"blob {digest} of {ref.name}: connection lost at byte {offset} "
                                            f"{failures} times in a row: {why}") from None
                    log.debug("blob %s: %s at byte %d; resuming", digest, why, offset)
                    guard.pause(backoff(failures - 1), why)
                    continue
            finally:
                resp.close()
            break
        verifier.finish()


def _check_content_range(resp: httpx.Response, start: int, digest: str) -> tuple[int, int, int | None]:
    """Parse `Content-Range: bytes S-E/TOTAL`; RegistryError unless it starts where we asked."""
    value = resp.headers.get("content-range", "")
    got = _parse_content_range(value)
    if got is None:
        raise RegistryError(f"blob {digest}: invalid Content-Range {value!r} in a 206 answer")
    if got[0] != start:
        raise RegistryError(f"blob {digest}: asked for bytes from {start}, the registry sent {value!r}")
    return got


def fetch_range(transport: Transport, ref: Reference, digest: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a blob. Not digest-verified here (a range cannot be): callers verify
    what they assemble (zTOC span digests). RangeNotSupportedError if the server sends it all;
    RegistryError when the options' `range_limits` end it (stalled every attempt, deadline)."""
    parts: list[bytes] = []

    def begin() -> RangeSink:
        parts.clear()
        return parts.append

    stream_range(transport, ref, digest, start, end, begin)
    return b"".join(parts)


def stream_range(transport: Transport, ref: Reference, digest: str, start: int, end: int,
                 begin: Callable[[], RangeSink]) -> None:
    """Bytes [start, end) of a blob handed to a sink as they arrive, as `fetch_range` reads them:
    each attempt takes its sink from `begin()` and gives it the range from its first byte, so a
    retry's sink starts over (what the sink did with a failed attempt's bytes is its own to undo).
    The sink may be given bytes past `end` before the count is found wrong (IntegrityError); an
    error the sink raises ends the read."""
    if start < 0 or end <= start:
        raise ValueError(f"invalid byte range [{start}, {end})")
    path = blob_path(ref, digest)
    scopes = (pull_scope(ref.repository),)
    headers = {**_IDENTITY, "Range": f"bytes={start}-{end - 1}"}
    what = f"blob {digest} of {ref.name} bytes {start}-{end - 1}"
    with transport.transfer(transport.options.range_limits, what) as guard:
        attempt = 0
        use_mirrors = True
        while True:
            ep, resp = transport.send(ref.registry, "GET", path, scopes=scopes, headers=headers,
                                      stream=True, mirrors=use_mirrors, guard=guard)
            try:
                raise_for_status(resp, what)
                if resp.status_code != 206:
                    if ep.mirror:
                        use_mirrors = False   # a mirror without Range support: ask the upstream
                        continue
                    raise RangeNotSupportedError(
                        f"registry {ep.host} ignored the Range request for blob {digest} of {ref.name} "
                        f"(answered {resp.status_code} with the whole blob); lazy loading needs a registry "
                        "that supports HTTP Range requests", status=resp.status_code)
                _, last, total = _check_content_range(resp, start, digest)
                if last != end - 1:
                    raise RegistryError(f"blob {digest}: asked for bytes {start}-{end - 1}, got {start}-{last}"
                                        + (f" (the blob has {total} bytes)" if total is not None else ""))
                # As received (no fixed-size pieces), so the guard sees the deadline pass on a slow link.
                sink = begin()
                received = 0
                for chunk in _guarded(transport, resp, guard, resp.iter_raw()):
                    received += len(chunk)
                    sink(chunk)
            except httpx.TransportError as e:
                attempt = _next_attempt(transport, guard, what, e, attempt)
                continue
            finally:
                resp.close()
            if received != end - start:
                raise IntegrityError(f"blob {digest}: range {start}-{end - 1} returned {received} bytes, "
                                     f"expected {end - start}", expected=digest)
            return


def fetch_ranges(transport: Transport, ref: Reference, digest: str,
                 ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
    """Bytes of several ranges [start, end) of a blob in ONE request (`Range: bytes=a-b,c-d`,
    answered as multipart/byteranges), in the order given; like `fetch_range`, not verified here.

    None when the registry does not serve several ranges in one answer: it sent the whole blob
    (200), one part that does not hold every range asked for (some storage behind registries
    keeps only the first range), or a multipart answer that is malformed, truncated, longer than
    asked or missing a range (logged). A body past its headers is not read further, and nothing
    of it is returned; the caller asks for the ranges one by one, which a registry that mangles
    several ranges still serves. RegistryError when the options' `range_limits` end the read."""
    if not ranges or any(s < 0 or e <= s for s, e in ranges):
        raise ValueError(f"invalid byte ranges {list(ranges)}")
    ordered = sorted(ranges)
    if any(b[0] < a[1] for a, b in zip(ordered, ordered[1:])):
        raise ValueError(f"overlapping byte ranges {list(ranges)}")
    path = blob_path(ref, digest)
    scopes = (pull_scope(ref.repository),)
    headers = {**_IDENTITY, "Range": "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in ranges)}
    what = f"blob {digest} of {ref.name}, {len(ranges)} ranges"
    # the parts' own headers and boundaries around the data: a few hundred bytes each
    most = sum(e - s for s, e in ranges) + _PART_OVERHEAD * (len(ranges) + 1)
    with transport.transfer(transport.options.range_limits, what) as guard:
        attempt = 0
        use_mirrors = True
        while True:
            ep, resp = transport.send(ref.registry, "GET", path, scopes=scopes, headers=headers,
                                      stream=True, mirrors=use_mirrors, guard=guard)
            try:
                raise_for_status(resp, what)
                got = _several_ranges(transport, resp, guard, ranges, most)
            except httpx.TransportError as e:
                attempt = _next_attempt(transport, guard, what, e, attempt)
                continue
            finally:
                resp.close()
            if isinstance(got, list):
                return got
            if ep.mirror:                  # a mirror that does not: ask the upstream
                use_mirrors = False
                continue
            if got:
                log.warning("%s: %s; asking for one range per request", what, got)
            return None


_PART_OVERHEAD = 512


def _several_ranges(transport: Transport, resp: httpx.Response, guard: TransferGuard,
                    ranges: Sequence[tuple[int, int]], most: int) -> list[bytes] | str:
    """The ranges' bytes out of an answer, or why it does not hold them ("" when the registry
    simply serves one range per request: the whole blob, or one part)."""
    if resp.status_code != 206:
        return ""
    kind = resp.headers.get("content-type", "")
    if kind.lower().startswith("multipart/byteranges"):
        boundary = _boundary(kind)
        if boundary is None:
            return f"a multipart answer without a boundary ({kind!r})"
        body = _read_at_most(transport, resp, guard, most)
        if body is None:
            return f"the answer runs past the {most} bytes asked for"
        parts = _parts(body, boundary)
        return parts if isinstance(parts, str) else _take_parts(parts, ranges)
    one = _parse_content_range(resp.headers.get("content-range", ""))
    if one is None:
        return f"invalid Content-Range {resp.headers.get('content-range', '')!r}"
    first, last, _ = one
    if first > min(s for s, _ in ranges) or last < max(e for _, e in ranges) - 1 or last + 1 - first > most:
        return ""                          # one range (or ranges joined into one too large to take)
    body = _read_at_most(transport, resp, guard, last + 1 - first)
    if body is None or len(body) != last + 1 - first:
        return f"{'more' if body is None else len(body)} bytes for the range {first}-{last}"
    return [bytes(body[s - first:e - first]) for s, e in ranges]


def _parse_content_range(value: str) -> tuple[int, int, int | None] | None:
    """`bytes S-E/TOTAL` as (S, E, TOTAL or None for `*`), or None if it is not that."""
    unit, _, rest = value.strip().partition(" ")
    span, _, total = rest.partition("/")
    s, _, e = span.partition("-")
    try:
        got = (int(s), int(e), None if total in ("*", "") else int(total))
    except ValueError:
        return None
    return got if unit == "bytes" and 0 <= got[0] <= got[1] else None


def _boundary(content_type: str) -> bytes | None:
    """The boundary parameter of a multipart Content-Type (quoted or not)."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value.strip('"'):
            return value.strip('"').encode("latin-1")
    return None


def _read_at_most(transport: Transport, resp: httpx.Response, guard: TransferGuard,
                  most: int) -> bytearray | None:
    """The whole body, or None once it runs past `most` bytes (the rest is not read)."""
    body = bytearray()
    for chunk in _guarded(transport, resp, guard, resp.iter_raw()):
        body += chunk
        if len(body) > most:
            return None
    return body


def _parts(body: bytearray, boundary: bytes) -> list[tuple[int, memoryview]] | str:
    """The (first offset, bytes) of each part of a multipart/byteranges body (views of it, not
    copies), or what is wrong with it. Each part's length is its Content-Range's, so data that
    happens to hold the boundary cannot cut a part short."""
    parts: list[tuple[int, memoryview]] = []
    view = memoryview(body)
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    while pos >= 0:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return parts                          # the closing delimiter
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            break
        value = None
        for line in body[pos:head_end].split(b"\r\n"):
            name, _, rest = line.partition(b":")
            if name.strip().lower() == b"content-range":
                value = rest.decode("latin-1")
        one = _parse_content_range(value) if value is not None else None
        if one is None:
            return f"a part of the answer without a valid Content-Range ({value!r})"
        first, last, _ = one
        start = head_end + 4
        data = view[start:start + last + 1 - first]
        if len(data) != last + 1 - first:
            break
        parts.append((first, data))
        pos = body.find(delimiter, start + len(data))
    return "the multipart answer is truncated or malformed"


def _take_parts(parts: list[tuple[int, memoryview]], ranges: Sequence[tuple[int, int]]) -> list[bytes] | str:
    """Each range's bytes out of the part that holds it (a server may join ranges into one part)."""
    out = []
    for s, e in ranges:
        for first, data in parts:
            if first <= s and e <= first + len(data):
                out.append(bytes(data[s - first:e - first]))
                break
        else:
            return f"the answer has no part holding bytes {s}-{e - 1}"
    return out


def _next_attempt(transport: Transport, guard: TransferGuard, what: str, e: httpx.TransportError,
                  attempt: int) -> int:
    """After a range read failed: RegistryError once the options' retries are spent, else pause
    (backoff, within the guard's deadline) and return the next attempt's number."""
    why = guard.explain(e) or describe(e)
    if attempt >= transport.options.max_retries:
        raise RegistryError(f"{what}: range read failed {attempt + 1} times: {why}") from None
    log.debug("%s: %s; retry %d", what, why, attempt + 1)
    guard.pause(backoff(attempt), why)
    return attempt + 1


def _guarded(transport: Transport, resp: httpx.Response, guard: TransferGuard,
             chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The body's chunks, each counted by the guard; `Transport.cancel()` can interrupt the reads."""
    with transport.receiving(resp):
        guard.start_body()
        for chunk in chunks:
            guard.received(len(chunk))
            yield chunk


def blob_exists(transport: Transport, ref: Reference, digest: str, scopes: tuple[str, ...]) -> bool:
    """HEAD the blob in the upstream registry (never a mirror: this decides what to push)."""
    _, resp = transport.send(ref.registry, "HEAD", blob_path(ref, digest), scopes=scopes)
    if resp.status_code == 200:
        return True
    if resp.status_code == 404:
        return False
    raise_for_status(resp, f"blob {digest} of {ref.name}")
    return False
