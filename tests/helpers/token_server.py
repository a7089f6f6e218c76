"""A small Docker token server (distribution's token auth spec) for a real docker-registry.

The registry is configured with `auth.token` (realm, service, issuer, and an x509
rootcertbundle); it accepts RS256 JWTs whose `kid` is the libtrust key ID of the
certificate's public key. Keys and signatures are made with the `openssl` command
(no extra Python dependency). Usage:

    with TokenServer(tmp_path / "token", users={"alice": "secret"}) as ts:
        reg = start_registry(tmp_path / "reg", token_auth=ts.registry_auth)
        ...
        ts.issued   # [(account or None, [scope, ...] granted)]

`refresh_tokens` maps OAuth2 refresh tokens (docker config `identitytoken`) to users,
for the POST flow (grant_type=refresh_token). Authenticated users get every action they ask for; anonymous callers get `pull`
only when `anonymous_pull` is set, otherwise an empty grant (the registry then
answers 401 insufficient_scope). Wrong credentials get 401.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from helpers.loopback_server import serve_in_thread, stop_server


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_der: bytes) -> str:
    """The key ID docker-registry computes: sha256 of the DER public key, 240 bits, base32 in 4s."""
    s = base64.b32encode(hashlib.sha256(public_der).digest()[:30]).decode().rstrip("=")
    return ":".join(s[i:i + 4] for i in range(0, len(s), 4))


class TokenServer:
    def __init__(self, workdir: Path, users: dict[str, str] | None = None, anonymous_pull: bool = False,
                 refresh_tokens: dict[str, str] | None = None,
                 service: str = "lazyoci-test-registry", issuer: str = "lazyoci-test-issuer",
                 expires_in: int = 300) -> None:
        self.workdir = workdir
        self.users = dict(users or {})
        self.anonymous_pull = anonymous_pull
        self.refresh_tokens = dict(refresh_tokens or {})
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.issued: list[tuple[str | None, list[str]]] = []
        self.refused = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def key_path(self) -> Path:
        return self.workdir / "token.key"

    @property
    def cert_path(self) -> Path:
        return self.workdir / "token.crt"

    def start(self) -> "TokenServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=lazyoci test token issuer", "-keyout", str(self.key_path),
                        "-out", str(self.cert_path)], check=True, capture_output=True)
        pub_pem = subprocess.run(["openssl", "x509", "-pubkey", "-noout", "-in", str(self.cert_path)],
                                 check=True, capture_output=True).stdout
        pub_der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub_pem,
                                 check=True, capture_output=True).stdout
        self.kid = libtrust_key_id(pub_der)
        owner = self

        class Handler(_TokenHandler):
            server_owner = owner

        self._server, self._thread = serve_in_thread(Handler)
        return self

    def stop(self) -> None:
        if self._server is not None:
            stop_server(self._server, self._thread)
            self._server = None

    def __enter__(self) -> "TokenServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def realm(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    @property
    def registry_auth(self) -> dict:
        """The `token_auth=` argument of helpers.registry.start_registry."""
        return {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                "rootcertbundle": str(self.cert_path)}

    def sign(self, claims: dict) -> str:
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key_path)],
                             input=signing_input.encode(), check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def grant(self, account: str | None, scopes: list[str]) -> list[dict]:
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            allowed = actions if account else (["pull"] if self.anonymous_pull and "pull" in actions else [])
            if allowed:
                access.append({"type": kind, "name": name, "actions": allowed})
        return access

    def token_for(self, account: str | None, scopes: list[str]) -> dict:
        now = int(time.time())
        access = self.grant(account, scopes)
        claims = {"iss": self.issuer, "sub": account or "", "aud": self.service, "exp": now + self.expires_in,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        with self._lock:
            self.issued.append((account, [f"{a['type']}:{a['name']}:{','.join(a['actions'])}" for a in access]))
        token = self.sign(claims)
        return {"token": token, "access_token": token, "expires_in": self.expires_in,
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}


class _TokenHandler(BaseHTTPRequestHandler):
    server_owner: TokenServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True    # TCP_NODELAY, as Go's net/http: no delayed-ACK wait per request

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, doc: dict) -> None:
        payload = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        owner = self.server_owner
        url = urlsplit(self.path)
        if url.path != "/token":
            return self._send(404, {"errors": [{"code": "NOT_FOUND", "message": "no such endpoint"}]})
        query = parse_qs(url.query)
        if query.get("service", [owner.service])[0] != owner.service:
            return self._send(400, {"errors": [{"code": "INVALID", "message": "unknown service"}]})
        account = None
        header = self.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            if owner.users.get(user) != password or not user:
                with owner._lock:
                    owner.refused += 1
                return self._send(401, {"errors": [{"code": "UNAUTHORIZED",
                                                    "message": "invalid username or password"}]})
            account = user
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        self._send(200, owner.token_for(account, scopes))

    def do_POST(self) -> None:
        """The OAuth2 flow docker uses with identity tokens: a form with grant_type=refresh_token."""
        owner = self.server_owner
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        if urlsplit(self.path).path != "/token" or form.get("service", [""])[0] != owner.service:
            return self._send(400, {"error": "invalid_request"})
        account = None
        if form.get("grant_type", [""])[0] == "refresh_token":
            account = owner.refresh_tokens.get(form.get("refresh_token", [""])[0])
        if account is None:
            with owner._lock:
                owner.refused += 1
            return self._send(401, {"error": "invalid_grant"})
        scopes = [s for value in form.get("scope", []) for s in value.split(" ") if s]
        self._send(200, owner.token_for(account, scopes))
