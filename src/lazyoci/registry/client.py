"""RegistryClient: the OCI distribution API as lazyoci uses it (synchronous, thread-safe).

Everything read is verified against its digest before it is returned (manifests)
or before the stream ends (blobs); everything pushed is checked against what the
registry says it stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import BinaryIO, Callable, Iterator

import httpx

from lazyoci.errors import AuthError, FormatError, IntegrityError, RegistryError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.digest import Digest, sha256_digest, verify_bytes
from lazyoci.oci.manifest import Descriptor, detect_media_type
from lazyoci.oci.reference import Reference
from lazyoci.registry import download, referrers as _referrers, upload
from lazyoci.registry.auth import basic_header, pull_scope, push_scope
from lazyoci.registry.credentials import Credentials, DockerConfig, registry_host
from lazyoci.registry.options import RegistryOptions
from lazyoci.registry.transport import Transport, raise_for_status

log = logging.getLogger(__name__)

# Manifests are small; a bigger answer is refused rather than read into memory.
MAX_MANIFEST_SIZE = 8 * 1024 * 1024
CREDENTIALS_TTL = 30.0


def _media_type_header(resp: httpx.Response) -> str | None:
    value = resp.headers.get("content-type")
    return value.split(";", 1)[0].strip() if value else None


class RegistryClient:
    """One client per process is enough: connections, tokens and endpoint choices are shared."""

    def __init__(self, options: RegistryOptions = RegistryOptions(),
                 credentials: Callable[[str], Credentials | None] | None = None) -> None:
        """`credentials`: where a registry's stored credentials come from (default: the docker
        config of `options`); the service, pulling for the CLI, asks the CLI (service/pull_runner.py)."""
        self.options = options
        self.docker_config = DockerConfig(options.docker_config)
        self._stored = credentials or self.docker_config.get
        self.transport = Transport(options, self._credentials)
        self._lock = threading.Lock()
        self._creds: dict[str, tuple[Credentials | None, float]] = {}
        self._acknowledged: set[tuple[str, str, str]] = set()   # (registry, repository, manifest digest)
        self._single_range: set[str] = set()     # registries that refused several ranges in one request

    def _credentials(self, registry: str) -> Credentials | None:
        """Stored credentials, cached briefly: a credential helper is a process per call, and a
        long-lived client (the lazy-loading service) still sees a later `lazyoci login`."""
        now = time.monotonic()
        with self._lock:
            hit = self._creds.get(registry)
        if hit is not None and hit[1] > now:
            return hit[0]
        creds = self._stored(registry)
        with self._lock:
            self._creds[registry] = (creds, now + CREDENTIALS_TTL)
        return creds

    def _forget_credentials(self) -> None:
        with self._lock:
            self._creds.clear()

    def close(self) -> None:
        self.transport.close()

    def cancel(self) -> None:
        """End every blob transfer in flight with a RegistryError and refuse new ones; for a
        process that is stopping while threads wait on a stalled registry."""
        self.transport.cancel()

    @property
    def last_refusal(self) -> float:
        """Monotonic time of the last transfer cancelled or refused since `cancel()` (0: none)."""
        return self.transport.cancellation.last_refusal

    @property
    def transfers_in_flight(self) -> int:
        """Blob downloads and Range reads under way (after `cancel()`: still ending)."""
        return self.transport.transfers_in_flight

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- manifests --------------------------------------------------------

    def _manifest_path(self, ref: Reference) -> str:
        return f"/v2/{ref.repository}/manifests/{ref.object}"

    def resolve(self, ref: Reference) -> Descriptor:
        """The descriptor (digest, media type, size) a tag or digest names: HEAD, else GET."""
        _, resp = self.transport.send(ref.registry, "HEAD", self._manifest_path(ref),
                                      scopes=(pull_scope(ref.repository),),
                                      headers={"Accept": mt.MANIFEST_ACCEPT}, mirrors=True)
        resp.close()
        if resp.status_code == 200:
            digest = resp.headers.get("docker-content-digest") or ref.digest
            media_type = _media_type_header(resp)
            length = resp.headers.get("content-length", "")
            if ref.digest and digest and digest != ref.digest:
                raise IntegrityError(f"{ref}: the registry resolved it to {digest}",
                                     expected=ref.digest, actual=digest)
            if digest and media_type in mt.ALL_MANIFESTS and length.isdigit():
                Digest.parse(digest)
                return Descriptor(media_type, digest, int(length))
        # No usable HEAD answer (some registries omit the digest header): GET and hash.
        raw, media_type, digest = self.get_manifest(ref)
        return Descriptor(media_type, digest, len(raw))

    def get_manifest(self, ref: Reference) -> tuple[bytes, str, str]:
        """(raw bytes, media type, digest) of a manifest or index, verified against a pinned digest."""
        _, resp = self.transport.send(ref.registry, "GET", self._manifest_path(ref),
                                      scopes=(pull_scope(ref.repository),),
                                      headers={"Accept": mt.MANIFEST_ACCEPT}, stream=True, mirrors=True)
        try:
            raise_for_status(resp, f"manifest {ref}")
            chunks, total = [], 0
            try:
                for chunk in resp.iter_bytes():
                    total += len(chunk)
                    if total > MAX_MANIFEST_SIZE:
                        raise FormatError(f"manifest {ref} is larger than {MAX_MANIFEST_SIZE} bytes")
                    chunks.append(chunk)
            except httpx.TransportError as e:
                raise RegistryError(f"manifest {ref}: connection lost: {e}") from None
            raw = b"".join(chunks)
            header_digest = resp.headers.get("docker-content-digest")
            header_type = _media_type_header(resp)
        finally:
            resp.close()
        if ref.digest:
            verify_bytes(raw, ref.digest, what=f"manifest {ref}")
            digest = ref.digest
        else:
            digest = sha256_digest(raw)
            if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
                raise IntegrityError(f"manifest {ref}: the registry says {header_digest}, the bytes are {digest}",
                                     expected=header_digest, actual=digest)
        try:
            media_type = detect_media_type(raw, header_type)
        except FormatError:
            if not header_type:
                raise
            media_type = header_type   # an artifact type we do not parse, returned as served
        return raw, media_type, digest

    def put_manifest(self, ref: Reference, raw: bytes, media_type: str) -> str:
        """PUT the bytes as given to `ref.object` (tag or digest); returns their digest."""
        digest = sha256_digest(raw)
        if ref.digest and ref.digest != digest:
            raise IntegrityError(f"push manifest {ref}: the bytes are {digest}", expected=ref.digest, actual=digest)
        _, resp = self.transport.send(ref.registry, "PUT", self._manifest_path(ref),
                                      scopes=(push_scope(ref.repository),),
                                      headers={"Content-Type": media_type}, content=raw)
        raise_for_status(resp, f"push manifest {ref}")
        stored = resp.headers.get("docker-content-digest")
        if stored and stored.startswith("sha256:") and stored != digest:
            raise IntegrityError(f"push manifest {ref}: the registry stored {stored}", expected=digest, actual=stored)
        if resp.headers.get("oci-subject"):
            with self._lock:
                self._acknowledged.add((ref.registry, ref.repository, digest))
        return digest

    def subject_acknowledged(self, ref: Reference, manifest_digest: str) -> bool:
        """Did the registry answer this client's PUT of that manifest with OCI-Subject?"""
        with self._lock:
            return (ref.registry, ref.repository, manifest_digest) in self._acknowledged

    # -- blobs ------------------------------------------------------------

    def iter_blob(self, ref: Reference, digest: str, size: int | None = None) -> Iterator[bytes]:
        return download.iter_blob(self.transport, ref, digest, size)

    def fetch_blob(self, ref: Reference, digest: str, size: int | None, sink: Callable[[bytes], None],
                   progress: Callable[[int], None] | None = None) -> None:
        """Stream a blob into `sink`; `progress` gets the running total of bytes received.
        Raises IntegrityError after the last chunk if size or digest are wrong."""
        done = 0
        for chunk in download.iter_blob(self.transport, ref, digest, size):
            sink(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)

    def fetch_range(self, ref: Reference, digest: str, start: int, end: int) -> bytes:
        return download.fetch_range(self.transport, ref, digest, start, end)

    def stream_range(self, ref: Reference, digest: str, start: int, end: int,
                     begin: Callable[[], download.RangeSink]) -> None:
        """A range's bytes into a sink as they arrive (`download.stream_range`)."""
        download.stream_range(self.transport, ref, digest, start, end, begin)

    def fetch_ranges(self, ref: Reference, digest: str, ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
        """Several ranges of a blob in one request (`download.fetch_ranges`), or None where the
        registry does not serve them so: once it has refused, this client asks it no more."""
        with self._lock:
            if ref.registry in self._single_range:
                return None
        got = download.fetch_ranges(self.transport, ref, digest, ranges)
        if got is None:
            log.info("registry %s does not serve several ranges in one answer: one request per range",
                     ref.registry)
            with self._lock:
                self._single_range.add(ref.registry)
        return got

    def blob_exists(self, ref: Reference, digest: str) -> bool:
        return download.blob_exists(self.transport, ref, digest, (pull_scope(ref.repository),))

    def push_blob(self, ref: Reference, digest: str, size: int, open_blob: Callable[[], BinaryIO],
                  progress: Callable[[int], None] | None = None, mount_from: Reference | None = None) -> str:
        """"exists", "mounted" or "pushed"; `progress` gets the running total of bytes sent."""
        return upload.push_blob(self.transport, ref, digest, size, open_blob, progress, mount_from)

    # -- referrers --------------------------------------------------------

    def referrers(self, ref: Reference, subject_digest: str, artifact_type: str | None = None) -> list[Descriptor]:
        return _referrers.referrers(self, ref, subject_digest, artifact_type)

    def add_referrer(self, ref: Reference, subject_digest: str, descriptor: Descriptor) -> None:
        _referrers.add_referrer(self, ref, subject_digest, descriptor)

    # -- login ------------------------------------------------------------

    def login(self, registry: str, username: str, password: str) -> None:
        """Check the credentials against the registry's /v2/ (as docker login does), then store them."""
        host = registry_host(registry)
        if not username or not password:
            raise AuthError(f"{host}: a username and a password are needed to log in")
        creds = Credentials(username, password)
        ep, resp = self.transport.send(host, "GET", "/v2/", scopes=(), authenticate=False)
        resp.close()
        if resp.status_code == 401:
            challenge = resp.headers.get("www-authenticate", "")
            if challenge.lower().lstrip().startswith("basic"):
                check = self.transport.request(ep, "GET", "/v2/", scopes=(), authenticate=False,
                                               headers={"Authorization": basic_header(creds)})
                raise_for_status(check, f"login to {host}")
            else:
                self.transport.auth.check_login(ep.host, creds, resp)
        else:
            raise_for_status(resp, f"login to {host}")
        self.docker_config.store(host, username, password)
        self._forget_credentials()
        self.transport.auth.forget(ep.host)

    def logout(self, registry: str) -> None:
        """Forget the stored credentials of `registry` (nothing happens if there were none)."""
        host = registry_host(registry)
        self.docker_config.erase(host)
        self._forget_credentials()
        for ep in self.transport.upstream(host):
            self.transport.auth.forget(ep.host)
