"""Blob uploads: skip what exists, mount across repositories, monolithic or chunked PUT.

Small blobs go up in one PUT (POST to open the session, then PUT with ?digest=);
large ones in PATCH chunks so memory stays flat and a failed chunk can resume
from what the registry reports it holds (GET on the upload URL, `Range: 0-N`).
"""

from __future__ import annotations

import time
from typing import BinaryIO, Callable

import httpx

from lazyoci.errors import IntegrityError, RegistryError
from lazyoci.oci.reference import Reference
from lazyoci.registry.auth import pull_scope, push_scope
from lazyoci.registry.download import blob_exists
from lazyoci.registry.transport import Body, Endpoint, Transport, backoff, describe, raise_for_status

MONOLITHIC_MAX = 16 * 1024 * 1024
CHUNK_SIZE = 8 * 1024 * 1024
_OCTETS = {"Content-Type": "application/octet-stream"}


def push_blob(transport: Transport, ref: Reference, digest: str, size: int,
              open_blob: Callable[[], BinaryIO], progress: Callable[[int], None] | None = None,
              mount_from: Reference | None = None) -> str:
    """Upload a blob unless the registry has it; returns "exists", "mounted" or "pushed"."""
    repo = ref.repository
    scopes: tuple[str, ...] = (push_scope(repo),)
    # the repository to mount from: another one on the same registry
    source = (mount_from.repository if mount_from is not None and mount_from.registry == ref.registry
              and mount_from.repository != repo else None)
    mount = source is not None
    if source is not None:
        scopes = tuple(sorted({push_scope(repo), pull_scope(source)}))
    what = f"push blob {digest} to {ref.name}"
    if blob_exists(transport, ref, digest, scopes):
        _report(progress, size)
        return "exists"
    params = {"mount": digest, "from": source} if source is not None else None
    ep, resp = transport.send(ref.registry, "POST", f"/v2/{repo}/blobs/uploads/", scopes=scopes,
                              content=b"", params=params)
    if mount and resp.status_code == 201:
        resp.close()
        _report(progress, size)
        return "mounted"
    raise_for_status(resp, what)
    location = _location(resp, what)
    with open_blob() as f:
        if size <= MONOLITHIC_MAX:
            data = f.read(size + 1)
            if len(data) != size:
                raise IntegrityError(f"{what}: the local blob has {len(data)} bytes, expected {size}",
                                     expected=digest)
            body = Body(data)
            del data
            resp = transport.request(ep, "PUT", location, scopes=scopes, headers=_OCTETS,
                                     content=body, params={"digest": digest})
            body.release()
        else:
            location = _patch_chunks(transport, ep, location, scopes, f, size, digest, progress, what)
            resp = transport.request(ep, "PUT", location, scopes=scopes, headers=_OCTETS,
                                     content=b"", params={"digest": digest})
    raise_for_status(resp, what)
    got = resp.headers.get("docker-content-digest")
    if got and got != digest:
        raise IntegrityError(f"{what}: the registry stored it as {got}", expected=digest, actual=got)
    _report(progress, size)
    return "pushed"


def _report(progress: Callable[[int], None] | None, done: int) -> None:
    if progress is not None:
        progress(done)


def _location(resp: httpx.Response, what: str) -> str:
    location = resp.headers.get("location")
    if not location:
        raise RegistryError(f"{what}: the registry opened an upload without a Location header",
                            status=resp.status_code)
    return str(resp.url.join(location))


def _patch_chunks(transport: Transport, ep: Endpoint, location: str, scopes: tuple[str, ...],
                  f: BinaryIO, size: int, digest: str, progress: Callable[[int], None] | None,
                  what: str) -> str:
    """PATCH the blob in CHUNK_SIZE pieces; returns the upload URL for the closing PUT."""
    offset = 0
    failures = 0
    while offset < size:
        chunk = f.read(min(CHUNK_SIZE, size - offset))
        if not chunk:
            raise IntegrityError(f"{what}: the local blob ended at {offset} bytes, expected {size}",
                                 expected=digest)
        headers = {**_OCTETS, "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
        body = Body(chunk)
        del chunk
        try:
            # Not retried blindly: the registry may have kept part of the chunk.
            resp = transport.request(ep, "PATCH", location, scopes=scopes, headers=headers,
                                     content=body, retries=0)
            if resp.status_code == 202:
                location = _location(resp, what)
                resp.close()
                offset += len(body)
                body.release()
                failures = 0
                _report(progress, offset)
                continue
            if resp.status_code < 500 and resp.status_code != 429:
                raise_for_status(resp, what)
                raise RegistryError(f"{what}: unexpected answer {resp.status_code} to a chunk",
                                    status=resp.status_code)
            reason = f"HTTP {resp.status_code}"
            resp.close()
        except RegistryError as e:
            if e.status is not None:
                raise
            reason = describe(e)
        body.release()
        failures += 1
        if failures > transport.options.max_retries:
            raise RegistryError(f"{what}: chunk at byte {offset} failed {failures} times: {reason}")
        time.sleep(backoff(failures - 1))
        held, location = _upload_status(transport, ep, location, scopes, what)
        # distribution reports an empty upload as "0-0", the same as one byte: our chunks are
        # never one byte long, so "0-0" before any acknowledged chunk means nothing is held.
        offset = 0 if (held == 1 and offset == 0) else held
        f.seek(offset)
    return location


def _upload_status(transport: Transport, ep: Endpoint, location: str, scopes: tuple[str, ...],
                   what: str) -> tuple[int, str]:
    """How many bytes the registry holds for this upload (its `Range: 0-<last>`), and the URL."""
    resp = transport.request(ep, "GET", location, scopes=scopes)
    raise_for_status(resp, what)
    value = resp.headers.get("range", "0--1")
    try:
        last = int(value.split("-", 1)[1])
    except (IndexError, ValueError):
        raise RegistryError(f"{what}: invalid upload status Range {value!r}") from None
    new_location = _location(resp, what) if resp.headers.get("location") else location
    return last + 1, new_location
