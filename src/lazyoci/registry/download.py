"""Blob downloads: verified streams that resume after resets, and Range reads for lazy loading.

Both run under a `TransferGuard` (registry/transfer.py): whole blobs with the
options' `blob_limits` (a minimum rate, no deadline), Range reads with its
`range_limits` (a deadline for the read, retries included, and a minimum rate).
"""

from __future__ import annotations

import logging
from typing import Iterator

import httpx

from lazyoci.errors import IntegrityError, RangeNotSupportedError, RegistryError
from lazyoci.oci.digest import Digest, DigestVerifier
from lazyoci.oci.reference import Reference
from lazyoci.registry.auth import pull_scope
from lazyoci.registry.transfer import TransferGuard
from lazyoci.registry.transport import Transport, backoff, describe, raise_for_status

log = logging.getLogger(__name__)

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
    try:
        unit, _, rest = value.partition(" ")
        span, _, total = rest.partition("/")
        s, _, e = span.partition("-")
        got = (int(s), int(e), None if total in ("*", "") else int(total))
    except ValueError:
        raise RegistryError(f"blob {digest}: invalid Content-Range {value!r} in a 206 answer") from None
    if unit != "bytes" or got[0] != start:
        raise RegistryError(f"blob {digest}: asked for bytes from {start}, the registry sent {value!r}")
    return got


def fetch_range(transport: Transport, ref: Reference, digest: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a blob. Not digest-verified here (a range cannot be): callers verify
    what they assemble (zTOC span digests). RangeNotSupportedError if the server sends it all;
    RegistryError when the options' `range_limits` end it (stalled every attempt, deadline)."""
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
                data = b"".join(_guarded(transport, resp, guard, resp.iter_raw()))
            except httpx.TransportError as e:
                why = guard.explain(e) or describe(e)
                if attempt >= transport.options.max_retries:
                    raise RegistryError(f"{what}: range read failed {attempt + 1} times: {why}") from None
                log.debug("%s: %s; retry %d", what, why, attempt + 1)
                guard.pause(backoff(attempt), why)
                attempt += 1
                continue
            finally:
                resp.close()
            if len(data) != end - start:
                raise IntegrityError(f"blob {digest}: range {start}-{end - 1} returned {len(data)} bytes, "
                                     f"expected {end - start}", expected=digest)
            return data


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
