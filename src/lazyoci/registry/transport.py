"""HTTP to registries: endpoint choice, authentication, retries, redirects, error mapping.

- Endpoints: loopback registries speak plain HTTP with no flag (as nerdctl);
  hosts in `insecure_registries` try HTTPS without certificate checks, then
  HTTP; every other host is HTTPS with verification. Pulls try the configured
  mirrors first (containerd hosts.toml style) and fall back to the upstream.
- Retries with exponential backoff on connection errors, 429 and 5xx
  (honouring Retry-After); 401 triggers one authentication round. A transfer
  with a `TransferGuard` (blob downloads) never waits past its deadline, and
  `cancel()` ends every transfer in flight at once.
- Redirects are followed by hand so that the registry's Authorization header
  never reaches another host (blob storage behind pre-signed URLs).
"""

from __future__ import annotations

import logging
import random
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import httpx

from lazyoci import __version__
from lazyoci.errors import AuthError, NotFoundError, RegistryError
from lazyoci.oci.reference import DEFAULT_REGISTRY, DOCKER_HUB_HOST, is_loopback_registry
from lazyoci.registry.auth import Authenticator
from lazyoci.registry.credentials import Credentials
from lazyoci.registry.options import RegistryOptions, TransferLimits
from lazyoci.registry.transfer import Cancellation, TransferGuard

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 10
_MAX_RETRY_AFTER = 10.0
_BASE_BACKOFF = 0.2
_MIRROR_RETRY_AFTER = 30.0
_CONNECT_TIMEOUT = 15.0


class Body:
    """A request body that can be sent again (retries, redirects, a 401) and then released.

    httpx responses sit in a reference cycle with their stream, so a plain `bytes` body
    stays alive until the cyclic GC runs: 8 MiB upload chunks would pile up. The uploader
    calls `release()` once a chunk is acknowledged, which keeps memory flat."""

    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data

    def __len__(self) -> int:
        return len(self.data or b"")

    def __iter__(self) -> Iterator[bytes]:
        if self.data is None:
            raise RuntimeError("request body already released")
        yield self.data

    def release(self) -> None:
        self.data = None


@dataclass(frozen=True)
class Endpoint:
    """One place that serves a registry's /v2/ API."""

    base: str            # scheme://host[:port][/prefix], no trailing slash; requests go to base + "/v2/..."
    host: str            # host[:port]: the key for challenges and tokens
    cred_key: str        # whose credentials to use (the registry name, or the mirror host)
    verify_tls: bool
    mirror: bool = False
    namespace: str | None = None   # for mirrors: the upstream registry, sent as ?ns= (containerd does)

    def url(self, path: str) -> str:
        return self.base + path


def upstream_endpoints(registry: str, options: RegistryOptions) -> list[Endpoint]:
    host = DOCKER_HUB_HOST if registry == DEFAULT_REGISTRY else registry
    if is_loopback_registry(host):
        return [Endpoint(f"http://{host}", host, registry, True)]
    if host in options.insecure_registries or registry in options.insecure_registries:
        return [Endpoint(f"https://{host}", host, registry, False), Endpoint(f"http://{host}", host, registry, False)]
    return [Endpoint(f"https://{host}", host, registry, True)]


def mirror_endpoints(registry: str, options: RegistryOptions) -> list[Endpoint]:
    urls = options.mirrors.get(registry) or ()
    if not urls and registry == DEFAULT_REGISTRY:
        urls = options.mirrors.get(DOCKER_HUB_HOST) or options.mirrors.get("index.docker.io") or ()
    out = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryError(f"registry mirror {url!r} of {registry} is not an http(s) URL")
        path = parts.path.rstrip("/").removesuffix("/v2")
        host = parts.netloc
        verify = not (host in options.insecure_registries or is_loopback_registry(host))
        out.append(Endpoint(f"{parts.scheme}://{host}{path}", host, host, verify, True, registry))
    return out


def _origin(url: httpx.URL | str) -> tuple[str, str, int | None]:
    u = httpx.URL(str(url))
    return (u.scheme, u.host, u.port)


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


def _load_httpcore() -> None:
    """Import httpcore, httpx's transport, before the first client is made.

    httpcore imports trio at import time, if it is installed, only to tell later which async
    library runs an async client; lazyoci's clients are synchronous, and trio's import is
    about 40 ms of CPU at the start of every command that talks to a registry. Unless trio
    is loaded already (the service runs on it), it is hidden for that one import: httpcore
    then treats it as not installed, which is what it is to a synchronous client."""
    if "httpcore" in sys.modules or "trio" in sys.modules:
        return
    sys.modules["trio"] = None      # type: ignore[assignment]   # `import trio` raises ImportError
    try:
        import httpcore  # noqa: F401
    finally:
        if "trio" in sys.modules and sys.modules["trio"] is None:
            del sys.modules["trio"]


class Transport:
    """Sends requests to registry endpoints; thread-safe (httpx clients and a locked auth cache)."""

    def __init__(self, options: RegistryOptions, credentials: Callable[[str], Credentials | None]) -> None:
        self.options = options
        _load_httpcore()
        timeout = httpx.Timeout(options.timeout, connect=min(options.timeout, _CONNECT_TIMEOUT))
        common: dict[str, Any] = dict(
            timeout=timeout, follow_redirects=False,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            headers={"User-Agent": f"lazyoci/{__version__}"},
        )
        self._common = common
        self._verified_client: httpx.Client | None = None     # made on first HTTPS use (_verified)
        self._unverified = httpx.Client(verify=False, **common)
        self.auth = Authenticator(credentials, self._send_token_request)
        self._lock = threading.Lock()
        self._working: dict[str, Endpoint] = {}   # registry -> upstream endpoint that answered
        self._dead_mirrors: dict[str, float] = {}  # mirror base -> monotonic time to try it again
        self.cancellation = Cancellation()
        self._receiving: set[httpx.Response] = set()   # bodies being read, for cancel()
        self.transfers_in_flight = 0

    @property
    def _verified(self) -> httpx.Client:
        """The client that checks certificates, made on first use: loading the CA bundle costs
        30-140 ms of CPU, which a command that talks only to a loopback registry (plain HTTP)
        never needs."""
        with self._lock:
            if self._verified_client is None:
                self._verified_client = httpx.Client(**self._common)
            return self._verified_client

    def close(self) -> None:
        with self._lock:
            verified, self._verified_client = self._verified_client, None
        if verified is not None:
            verified.close()
        self._unverified.close()

    def cancel(self) -> None:
        """End every guarded transfer now and refuse new ones (the service is stopping).

        A thread blocked reading a body is woken by shutting its socket down; one waiting for
        an answer's headers wakes within its read timeout (one rate window at most)."""
        self.cancellation.set()
        with self._lock:
            receiving = list(self._receiving)
        for resp in receiving:
            _shutdown(resp)

    @contextmanager
    def transfer(self, limits: TransferLimits, what: str) -> Iterator[TransferGuard]:
        """A blob transfer from start to end: its guard (deadline and rate floor, ended early
        by `cancel()`), and a count of transfers in flight for a process that is stopping."""
        with self._lock:
            self.transfers_in_flight += 1
        try:
            yield TransferGuard(limits, self.cancellation, what)
        finally:
            with self._lock:
                self.transfers_in_flight -= 1

    @contextmanager
    def receiving(self, resp: httpx.Response) -> Iterator[httpx.Response]:
        """Mark a response whose body is being read, so that `cancel()` can interrupt it."""
        with self._lock:
            self._receiving.add(resp)
        try:
            if self.cancellation.is_set():
                _shutdown(resp)
            yield resp
        finally:
            with self._lock:
                self._receiving.discard(resp)

    def _pause(self, seconds: float, guard: TransferGuard | None, failure: str) -> None:
        if guard is not None:
            guard.pause(seconds, failure)
        elif self.cancellation.wait(seconds):
            raise self.cancellation.refuse(failure)

    def _client_for(self, url: httpx.URL) -> httpx.Client:
        if url.scheme == "http":
            return self._unverified        # no TLS, so nothing to verify: the client without a CA bundle
        host = url.netloc.decode()
        if host in self.options.insecure_registries or url.host in self.options.insecure_registries:
            return self._unverified
        return self._verified

    def _send_token_request(self, request: httpx.Request) -> httpx.Response:
        return self._client_for(request.url).send(request)

    # -- choosing endpoints -------------------------------------------------

    def upstream(self, registry: str) -> list[Endpoint]:
        eps = upstream_endpoints(registry, self.options)
        with self._lock:
            good = self._working.get(registry)
        if good in eps:
            eps.remove(good)
            eps.insert(0, good)
        return eps

    def send(self, registry: str, method: str, path: str, *, scopes: tuple[str, ...],
             headers: dict[str, str] | None = None, content: "bytes | Body | None" = None,
             params: dict[str, str] | None = None, stream: bool = False,
             mirrors: bool = False, authenticate: bool = True,
             guard: TransferGuard | None = None) -> tuple[Endpoint, httpx.Response]:
        """Send to the mirrors (pulls, when `mirrors`) and then the upstream, returning the first
        usable answer and the endpoint that gave it. A mirror that fails or errors is skipped;
        the upstream's answer is returned whatever its status (see `raise_for_status`)."""
        now = time.monotonic()
        with self._lock:
            live = [m for m in (mirror_endpoints(registry, self.options) if mirrors else [])
                    if self._dead_mirrors.get(m.base, 0.0) <= now]
        candidates = live + self.upstream(registry)
        last_exc: RegistryError | None = None
        for i, ep in enumerate(candidates):
            final = i == len(candidates) - 1
            # Not retried when another candidate follows: a mirror falls back to the upstream at
            # once, and an insecure host's HTTPS attempt is followed by plain HTTP.
            retries = None if final else 0
            try:
                resp = self.request(ep, method, path, scopes=scopes, headers=headers, content=content,
                                    params=params, stream=stream, retries=retries,
                                    authenticate=authenticate, guard=guard)
            except RegistryError as e:
                last_exc = e
                if final:
                    raise
                log.debug("%s %s: %s; trying the next endpoint", method, ep.base, e)
                if ep.mirror and e.status is None and not isinstance(e, AuthError):
                    # Unreachable: skip it for a while instead of paying a timeout per request.
                    with self._lock:
                        self._dead_mirrors[ep.base] = time.monotonic() + _MIRROR_RETRY_AFTER
                continue
            if ep.mirror and resp.status_code >= 400 and not final:
                log.debug("mirror %s answered %s to %s %s; falling back", ep.base, resp.status_code, method, path)
                resp.close()
                continue
            if not ep.mirror:
                with self._lock:
                    self._working[registry] = ep
            return ep, resp
        assert last_exc is not None
        raise last_exc

    # -- one endpoint ------------------------------------------------------

    def request(self, ep: Endpoint, method: str, target: str, *, scopes: tuple[str, ...],
                headers: dict[str, str] | None = None, content: "bytes | Body | None" = None,
                params: dict[str, str] | None = None, stream: bool = False,
                retries: int | None = None, authenticate: bool = True,
                guard: TransferGuard | None = None) -> httpx.Response:
        """One logical request to `ep` (path "/v2/..." or an absolute URL from a Location header).

        Returns the final response of any status; raises RegistryError only when the
        endpoint cannot be reached after the retries (or, with a `guard`, in time)."""
        retries = self.options.max_retries if retries is None else retries
        url = httpx.URL(target if "://" in target else ep.url(target))
        if ep.mirror and ep.namespace:
            params = {**(params or {}), "ns": ep.namespace}
        if params:
            url = url.copy_merge_params(params)
        auth = self.auth.authorization(ep.host, ep.cred_key, scopes) if authenticate else None
        reauthed = not authenticate
        attempt = 0
        while True:
            timeout = None
            if guard is not None:
                guard.check()
                timeout = guard.timeout(self.options.timeout, min(self.options.timeout, _CONNECT_TIMEOUT))
            try:
                resp = self._follow(ep, method, url, dict(headers or {}), content, stream, auth, timeout)
            except httpx.TransportError as e:
                failure = f"cannot reach registry {ep.host}: {describe(e)}"
                if attempt >= retries:
                    raise RegistryError(failure) from None
                log.debug("%s %s: %s; retry %d", method, url, describe(e), attempt + 1)
                self._pause(backoff(attempt), guard, failure)
                attempt += 1
                continue
            if resp.status_code == 401 and not reauthed and _origin(resp.url) == _origin(url):
                reauthed = True
                fresh = self.auth.on_unauthorized(ep.host, ep.cred_key, scopes, resp)
                if fresh is not None and fresh != auth:
                    resp.close()
                    auth = fresh
                    continue
                return resp
            if resp.status_code in RETRY_STATUSES and attempt < retries:
                delay = retry_after(resp, attempt)
                if guard is not None and not guard.fits(delay):
                    log.debug("%s %s: HTTP %d; a retry in %.1fs would pass the deadline",
                              method, url, resp.status_code, delay)
                    return resp      # the caller reports the registry's own answer
                log.debug("%s %s: HTTP %d; retry %d in %.1fs", method, url, resp.status_code, attempt + 1, delay)
                resp.close()
                self._pause(delay, guard, f"{ep.host} answered HTTP {resp.status_code}")
                attempt += 1
                continue
            return resp

    def _follow(self, ep: Endpoint, method: str, url: httpx.URL, headers: dict[str, str],
                content: "bytes | Body | None", stream: bool, auth: str | None,
                timeout: httpx.Timeout | None = None) -> httpx.Response:
        origin = _origin(url)
        explicit = headers.pop("Authorization", None)
        auth = auth or explicit
        for _ in range(_MAX_REDIRECTS + 1):
            sent = dict(headers)
            # The registry's credentials are for the registry only: a redirect to blob storage
            # on another host must not carry them (pre-signed URLs carry their own).
            if auth and _origin(url) == origin:
                sent["Authorization"] = auth
            client = self._unverified if (not ep.verify_tls and url.host == httpx.URL(ep.base).host) \
                else self._client_for(url)
            if isinstance(content, Body):
                sent["Content-Length"] = str(len(content))   # a known length, not chunked encoding
            request = client.build_request(method, url, headers=sent, content=content,
                                           timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout)
            resp = client.send(request, stream=stream)
            location = resp.headers.get("location")
            if resp.status_code not in _REDIRECTS or not location:
                return resp
            resp.close()
            url = resp.url.join(location)
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST"):
                method, content = ("GET" if method != "HEAD" else "HEAD"), None
        raise RegistryError(f"{ep.host}: too many redirects for {method} {url}")


def _shutdown(resp: httpx.Response) -> None:
    """Shut the socket under a response down, waking a thread blocked reading its body."""
    stream = resp.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:     # already closed
            pass


def backoff(attempt: int) -> float:
    return _BASE_BACKOFF * (2 ** attempt) * (0.75 + random.random() / 2)


def retry_after(resp: httpx.Response, attempt: int) -> float:
    value = resp.headers.get("retry-after", "")
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER)
    return backoff(attempt)


def error_detail(resp: httpx.Response) -> tuple[str, str | None]:
    """(message, code) from the registry's `{"errors": [{"code", "message"}]}` body, else the HTTP reason."""
    try:
        resp.read()   # a streamed error answer is small; a non-streamed one returns its content
        doc = resp.json()
        errors = doc.get("errors") if isinstance(doc, dict) else None
    except (ValueError, httpx.HTTPError, UnicodeDecodeError):
        errors = None
    if isinstance(errors, list) and errors:
        messages = []
        for err in errors:
            if isinstance(err, dict):
                msg = str(err.get("message") or err.get("code") or "").strip()
                if msg and msg not in messages:
                    messages.append(msg)
        code = errors[0].get("code") if isinstance(errors[0], dict) else None
        if messages:
            return "; ".join(messages), code
    text = ""
    try:
        text = resp.text.strip()
    except (httpx.HTTPError, UnicodeDecodeError):
        pass
    if text and len(text) < 200 and "<" not in text:
        return text, None
    return resp.reason_phrase or f"HTTP {resp.status_code}", None


def raise_for_status(resp: httpx.Response, what: str) -> None:
    """Turn an error answer into RegistryError / AuthError / NotFoundError with the registry's message."""
    status = resp.status_code
    if status < 400:
        return
    message, code = error_detail(resp)
    resp.close()
    suffix = f"HTTP {status}" + (f" {code}" if code else "")
    if status in (401, 403):
        hint = "; check `lazyoci login`" if status == 401 else ""
        raise AuthError(f"{what}: {message} ({suffix}{hint})", status=status, code=code)
    if status == 404:
        raise NotFoundError(f"{what}: {message} ({suffix})", status=status, code=code)
    raise RegistryError(f"{what}: {message} ({suffix})", status=status, code=code)
