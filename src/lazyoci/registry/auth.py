"""Registry authentication: WWW-Authenticate challenges, Basic, and Bearer tokens.

Registries say how to authenticate in a 401's `WWW-Authenticate` header. For
`Basic` we send the stored credentials; for `Bearer` we ask the token server
(`realm`) for a token covering the scopes of the request
(`repository:<name>:pull[,push]`), with Basic credentials when we have some and
anonymously otherwise. Tokens are cached per host and scope set until shortly
before they expire, and a host's challenge is remembered so later requests
authenticate up front instead of paying a 401 round trip each time.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

from lazyoci.errors import AuthError, RegistryError
from lazyoci.registry.credentials import Credentials

# Refresh a token this long before the server says it expires (clock skew, slow requests).
_EXPIRY_MARGIN = 10.0
# The distribution token spec: "if not returned, assume 60 seconds".
_DEFAULT_EXPIRES_IN = 60


@dataclass(frozen=True)
class Challenge:
    scheme: str                                   # lower case: "basic", "bearer", ...
    params: dict[str, str] = field(default_factory=dict, compare=False)


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?:\s+|$|,)")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value (RFC 7235), which may hold several challenges."""
    out: list[Challenge] = []
    pos = 0
    while pos < len(header):
        while pos < len(header) and header[pos] in " ,":
            pos += 1
        m = _SCHEME_RE.match(header, pos)
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while True:
            pm = _PARAM_RE.match(header, pos)
            if not pm:
                break
            value = pm.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[pm.group(1).lower()] = value
            pos = pm.end()
        out.append(Challenge(scheme, params))
    return out


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


class Authenticator:
    """Chooses the Authorization header for a request; thread-safe.

    `credentials(key)` returns the stored credentials of a registry (or None);
    `send(request)` performs the token-server request (the transport's client,
    so TLS settings and proxies are the same).
    """

    def __init__(self, credentials: Callable[[str], Credentials | None],
                 send: Callable[[httpx.Request], httpx.Response]) -> None:
        self._credentials = credentials
        self._send = send
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, tuple[str, ...]], tuple[str, float]] = {}

    def authorization(self, host: str, cred_key: str, scopes: tuple[str, ...]) -> str | None:
        """The header to send up front, given what this host asked for before (None: none known)."""
        with self._lock:
            challenge = self._challenges.get(host)
            cached = self._tokens.get((host, scopes))
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._credentials(cred_key)
            return basic_header(creds) if creds else None
        if challenge.scheme == "bearer":
            if cached and cached[1] > time.monotonic():
                return "Bearer " + cached[0]
            return self._fetch_token(host, cred_key, challenge, scopes)
        return None

    def on_unauthorized(self, host: str, cred_key: str, scopes: tuple[str, ...],
                        response: httpx.Response) -> str | None:
        """After a 401: learn the challenge and return a header worth one more try (None: nothing to try)."""
        challenges = parse_challenges(response.headers.get("www-authenticate", ""))
        chosen = next((c for c in challenges if c.scheme == "bearer"), None) or \
            next((c for c in challenges if c.scheme == "basic"), None)
        if chosen is None:
            return None
        with self._lock:
            self._challenges[host] = chosen
            self._tokens.pop((host, scopes), None)
        if chosen.scheme == "basic":
            creds = self._credentials(cred_key)
            return basic_header(creds) if creds else None
        wanted = scopes
        extra = chosen.params.get("scope")
        if extra:
            wanted = tuple(sorted(set(scopes) | set(extra.split(" "))))
        return self._fetch_token(host, cred_key, chosen, wanted, cache_as=scopes)

    def forget(self, host: str) -> None:
        """Drop cached tokens and challenges of a host (after login/logout)."""
        with self._lock:
            self._challenges.pop(host, None)
            for key in [k for k in self._tokens if k[0] == host]:
                del self._tokens[key]

    def check_login(self, host: str, creds: Credentials, response: httpx.Response) -> None:
        """Verify credentials against a /v2/ 401 challenge, as `docker login` does; AuthError if refused."""
        challenges = parse_challenges(response.headers.get("www-authenticate", ""))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            self._request_token(host, bearer, (), creds)
            return
        raise AuthError(f"{host}: credentials were refused", status=401)

    def _fetch_token(self, host: str, cred_key: str, challenge: Challenge, scopes: tuple[str, ...],
                     cache_as: tuple[str, ...] | None = None) -> str:
        token, expires_in = self._request_token(host, challenge, scopes, self._credentials(cred_key))
        with self._lock:
            self._tokens[(host, cache_as if cache_as is not None else scopes)] = (
                token, time.monotonic() + max(expires_in - _EXPIRY_MARGIN, 1.0))
        return "Bearer " + token

    def _request_token(self, host: str, challenge: Challenge, scopes: tuple[str, ...],
                       creds: Credentials | None) -> tuple[str, int]:
        realm = challenge.params.get("realm")
        if not realm or "://" not in realm:
            raise AuthError(f"{host}: Bearer challenge without a usable realm: {challenge.params!r}", status=401)
        service = challenge.params.get("service")
        if creds is not None and creds.username == "<token>":
            # An identity (refresh) token from the docker config: the OAuth2 POST flow.
            form = {"grant_type": "refresh_token", "refresh_token": creds.password,
                    "client_id": "lazyoci", "scope": " ".join(scopes)}
            if service:
                form["service"] = service
            request = httpx.Request("POST", realm, data=form)
        else:
            params: list[tuple[str, str | int | float | bool | None]] = []
            if service:
                params.append(("service", service))
            params += [("scope", s) for s in scopes]
            if creds is not None:
                params.append(("account", creds.username))
            headers = {"Authorization": basic_header(creds)} if creds is not None else {}
            request = httpx.Request("GET", realm, params=params, headers=headers)
        try:
            response = self._send(request)
        except httpx.HTTPError as e:
            raise RegistryError(f"{host}: cannot reach the token server {realm}: {e}") from None
        if response.status_code in (401, 403):
            raise AuthError(f"{host}: the token server {realm} refused the credentials "
                            f"({response.status_code}{_body_hint(response)})", status=response.status_code)
        if response.status_code != 200:
            raise RegistryError(f"{host}: the token server {realm} answered {response.status_code}"
                                f"{_body_hint(response)}", status=response.status_code)
        try:
            doc = response.json()
            token = doc.get("token") or doc.get("access_token")
            expires_in = int(doc.get("expires_in") or _DEFAULT_EXPIRES_IN)
        except (ValueError, AttributeError, TypeError):
            raise AuthError(f"{host}: the token server {realm} sent an invalid answer") from None
        if not token or not isinstance(token, str):
            raise AuthError(f"{host}: the token server {realm} sent no token")
        return token, expires_in


def _body_hint(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return f": {text[:200]}" if text else ""
