"""Authentication against real registries: htpasswd Basic auth and token auth (Bearer)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers.fault_proxy import Fault, FaultProxy
from helpers.registry import start_registry
from helpers.token_server import TokenServer
from lazyoci.errors import AuthError, ConfigError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import canonical_json
from lazyoci.oci.reference import Reference
from lazyoci.registry import (DockerConfig, RegistryClient, RegistryOptions, config_key,
                              parse_challenges, registry_host)

USER, PASSWORD = "alice", "s3cret!pw"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory):
    work = tmp_path_factory.mktemp("basic-registry")
    htpasswd = work / "htpasswd"
    htpasswd.write_bytes(subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True,
                                        capture_output=True).stdout)
    reg = start_registry(work / "reg", htpasswd=htpasswd)
    yield reg, USER, PASSWORD
    reg.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    work = tmp_path_factory.mktemp("token-registry")
    with TokenServer(work / "token", users={USER: PASSWORD}, refresh_tokens={"rt-alice-123": USER}) as ts:
        reg = start_registry(work / "reg", token_auth=ts.registry_auth)
        yield reg, ts
        reg.stop()


def write_auths(path, host: str, user: str, password: str) -> None:
    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))


def push_small_image(client: RegistryClient, ref: Reference) -> bytes:
    layer, cfg = os.urandom(4096), b'{"os":"linux","architecture":"amd64"}'
    for blob in (layer, cfg):
        client.push_blob(ref, sha(blob), len(blob), lambda b=blob: io.BytesIO(b))
    raw = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                          "config": {"mediaType": mt.OCI_CONFIG, "digest": sha(cfg), "size": len(cfg)},
                          "layers": [{"mediaType": mt.OCI_LAYER_TAR, "digest": sha(layer), "size": len(layer)}]})
    client.put_manifest(ref, raw, mt.OCI_MANIFEST)
    return raw


# -- challenge parsing and docker config -----------------------------------

def test_parse_challenges():
    (c,) = parse_challenges('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                            'scope="repository:library/ubuntu:pull"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                        "scope": "repository:library/ubuntu:pull"}
    two = parse_challenges('Basic realm="Registry Realm", Bearer realm="https://x/t",error="insufficient_scope"')
    assert [c.scheme for c in two] == ["basic", "bearer"]
    assert two[0].params == {"realm": "Registry Realm"} and two[1].params["error"] == "insufficient_scope"
    assert parse_challenges('Bearer realm="a \\"quoted\\" realm"')[0].params["realm"] == 'a "quoted" realm'
    assert parse_challenges("") == []


def test_docker_config_keys_and_entries(tmp_path, monkeypatch):
    assert config_key("docker.io") == config_key("registry-1.docker.io") == "https://index.docker.io/v1/"
    assert registry_host("https://index.docker.io/v1/") == "docker.io"
    assert config_key("https://reg.lan:5000/v2/") == "reg.lan:5000"
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hubpw").decode()},
        "http://reg.lan:5000": {"username": "u", "password": "p"},
        "broken.lan": {"auth": "!!!"}}}))
    cfg = DockerConfig(path)
    assert (cfg.get("docker.io").username, cfg.get("docker.io").password) == ("hubuser", "hubpw")
    assert cfg.get("reg.lan:5000").password == "p"
    assert "hubpw" not in repr(cfg.get("docker.io"))
    assert cfg.get("other.lan") is None
    with pytest.raises(ConfigError, match="base64"):
        cfg.get("broken.lan")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert DockerConfig().path == path
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        cfg.get("docker.io")


def test_credential_helper(tmp_path, monkeypatch, basic_registry):
    """credHelpers and credsStore run the real docker-credential-<name> protocol."""
    reg, user, password = basic_registry
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-lazyocitest"
    store = tmp_path / "helper-store"
    store.mkdir()
    # A shell helper speaking the docker-credential protocol: one file per server URL.
    helper.write_text(f"""#!/bin/sh
read -r line
case "$1" in
get) f="{store}/$(printf %s "$line" | tr '/:' '__')"
     if [ -f "$f" ]; then cat "$f"; else echo "credentials not found in native keychain"; exit 1; fi ;;
store) url=$(printf %s "$line" | sed 's/.*"ServerURL": *"\\([^"]*\\)".*/\\1/')
     printf %s "$line" > "{store}/$(printf %s "$url" | tr '/:' '__')" ;;
erase) rm -f "{store}/$(printf %s "$line" | tr '/:' '__')" ;;
esac
""")
    entry = store / reg.host.replace(":", "_")
    entry.write_text(json.dumps({"ServerURL": reg.host, "Username": user, "Secret": password}))
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"credHelpers": {reg.host: "lazyocitest"}}))
    with RegistryClient(RegistryOptions(docker_config=cfg)) as c:
        ref = Reference.parse(f"{reg.host}/auth/helper:v1")
        raw = push_small_image(c, ref)
        assert c.get_manifest(ref)[0] == raw
        c.logout(reg.host)
        assert not entry.exists()
        c.login(reg.host, user, password)      # stored through the helper again
        assert json.loads(entry.read_text())["Secret"] == password
    cfg.write_text(json.dumps({"credsStore": "missinghelper"}))
    with pytest.raises(ConfigError, match="docker-credential-missinghelper"):
        DockerConfig(cfg).get(reg.host)


# -- Basic auth (htpasswd) -------------------------------------------------

def test_basic_auth_with_docker_config(tmp_path, basic_registry):
    reg, user, password = basic_registry
    cfg = tmp_path / "config.json"
    ref = Reference.parse(f"{reg.host}/auth/basic:v1")
    with RegistryClient(RegistryOptions(docker_config=cfg)) as anon:
        with pytest.raises(AuthError, match="authentication required") as e:
            anon.get_manifest(ref)
        assert e.value.status == 401
    write_auths(cfg, reg.host, user, password)
    with RegistryClient(RegistryOptions(docker_config=cfg)) as c:
        raw = push_small_image(c, ref)
        assert c.get_manifest(ref)[0] == raw
    write_auths(cfg, reg.host, user, "wrong")
    with RegistryClient(RegistryOptions(docker_config=cfg)) as c:
        with pytest.raises(AuthError, match="authentication required"):
            c.resolve(ref)


def test_login_and_logout_basic(tmp_path, basic_registry):
    reg, user, password = basic_registry
    cfg = tmp_path / "docker" / "config.json"
    with RegistryClient(RegistryOptions(docker_config=cfg)) as c:
        with pytest.raises(AuthError):
            c.login(reg.host, user, "wrong")
        assert not cfg.exists()
        c.login(reg.host, user, password)
        doc = json.loads(cfg.read_text())
        assert base64.b64decode(doc["auths"][reg.host]["auth"]).decode() == f"{user}:{password}"
        assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
        push_small_image(c, Reference.parse(f"{reg.host}/auth/login:v1"))
        c.logout(reg.host)
        assert reg.host not in json.loads(cfg.read_text()).get("auths", {})
        with pytest.raises(AuthError):
            c.resolve(Reference.parse(f"{reg.host}/auth/login:v1"))


class _Storage(BaseHTTPRequestHandler):
    """Blob storage behind a redirect: records the headers it was sent."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []
    body = b""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def test_redirect_to_storage_does_not_leak_authorization(tmp_path, basic_registry):
    """Behind Basic auth, a blob GET redirected to another host goes there without Authorization."""
    reg, user, password = basic_registry
    blob = os.urandom(100_000)
    handler = type("Storage", (_Storage,), {"seen": [], "body": blob})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with RegistryClient(RegistryOptions(docker_config=tmp_path / "config.json")) as c, \
                FaultProxy(reg.host) as proxy:
            c.login(proxy.host, user, password)
            ref = Reference.parse(f"{proxy.host}/auth/redirect:v1")
            c.push_blob(ref, sha(blob), len(blob), lambda: io.BytesIO(blob))
            storage = f"http://127.0.0.1:{server.server_address[1]}/bucket/blob?sig=abc"
            proxy.add(Fault("redirect", match="/blobs/sha256:", method="GET", location=storage))
            assert b"".join(c.iter_blob(ref, sha(blob), len(blob))) == blob
            assert len(handler.seen) == 1
            assert not any(k.lower() == "authorization" for k in handler.seen[0])
            assert proxy.count("GET", "/blobs/sha256:", status=307) == 1
    finally:
        server.shutdown()
        server.server_close()


# -- token auth (Bearer) ---------------------------------------------------

def test_token_auth_push_pull_and_token_cache(tmp_path, token_registry):
    reg, ts = token_registry
    cfg = tmp_path / "config.json"
    write_auths(cfg, reg.host, USER, PASSWORD)
    ref = Reference.parse(f"{reg.host}/auth/token:v1")
    with RegistryClient(RegistryOptions(docker_config=cfg)) as c:
        raw = push_small_image(c, ref)
        assert any(acc == USER and "repository:auth/token:pull,push" in scopes for acc, scopes in ts.issued)
        assert c.get_manifest(ref)[0] == raw
        before = len(ts.issued)
        for _ in range(3):                   # cached token: no new token requests
            assert c.resolve(ref).digest == sha(raw)
        assert len(ts.issued) == before
    # Anonymous: the token server grants nothing, the registry's message reaches the user.
    with RegistryClient(RegistryOptions(docker_config=tmp_path / "none.json")) as anon:
        with pytest.raises(AuthError, match="authentication required|insufficient") as e:
            anon.get_manifest(ref)
        assert e.value.status == 401


def test_token_auth_login(tmp_path, token_registry):
    reg, ts = token_registry
    cfg = tmp_path / "config.json"
    with RegistryClient(RegistryOptions(docker_config=cfg)) as c:
        with pytest.raises(AuthError, match="refused the credentials"):
            c.login(reg.host, USER, "bad")
        c.login(reg.host, USER, PASSWORD)
        assert reg.host in json.loads(cfg.read_text())["auths"]
        ref = Reference.parse(f"{reg.host}/auth/token-login:v1")
        raw = push_small_image(c, ref)
        assert c.get_manifest(ref)[0] == raw


def test_token_auth_anonymous_pull(tmp_path, token_registry):
    reg, ts = token_registry
    cfg = tmp_path / "config.json"
    write_auths(cfg, reg.host, USER, PASSWORD)
    ref = Reference.parse(f"{reg.host}/auth/public:v1")
    with RegistryClient(RegistryOptions(docker_config=cfg)) as c:
        raw = push_small_image(c, ref)
    ts.anonymous_pull = True
    try:
        with RegistryClient(RegistryOptions(docker_config=tmp_path / "none.json")) as anon:
            assert anon.get_manifest(ref)[0] == raw
            assert ts.issued[-1] == (None, ["repository:auth/public:pull"])
            with pytest.raises(AuthError):
                push_small_image(anon, Reference.parse(f"{reg.host}/auth/public:v2"))
    finally:
        ts.anonymous_pull = False


def test_token_auth_with_identity_token(tmp_path, token_registry):
    """A docker config `identitytoken` is exchanged through the OAuth2 POST flow."""
    reg, ts = token_registry
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {reg.host: {"identitytoken": "rt-alice-123"}}}))
    ref = Reference.parse(f"{reg.host}/auth/identity:v1")
    with RegistryClient(RegistryOptions(docker_config=cfg)) as c:
        raw = push_small_image(c, ref)
        assert c.get_manifest(ref)[0] == raw
        assert ts.issued[-1][0] == USER
    cfg.write_text(json.dumps({"auths": {reg.host: {"identitytoken": "revoked"}}}))
    with RegistryClient(RegistryOptions(docker_config=cfg)) as c:
        with pytest.raises(AuthError, match="refused the credentials"):
            c.get_manifest(ref)


def test_token_refreshed_when_it_expires(tmp_path, token_registry):
    reg, ts = token_registry
    cfg = tmp_path / "config.json"
    write_auths(cfg, reg.host, USER, PASSWORD)
    ref = Reference.parse(f"{reg.host}/auth/expiry:v1")
    ts.expires_in = 11          # cached for 1 s: tokens are renewed 10 s before they expire
    try:
        with RegistryClient(RegistryOptions(docker_config=cfg)) as c:
            push_small_image(c, ref)
            c.resolve(ref)
            before = len(ts.issued)
            c.resolve(ref)
            assert len(ts.issued) == before
            time.sleep(1.1)
            c.resolve(ref)
            assert len(ts.issued) == before + 1
    finally:
        ts.expires_in = 300
