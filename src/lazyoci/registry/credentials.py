"""Registry credentials from the docker config file, so `docker login` habits carry over.

The file is docker's `config.json` (`$DOCKER_CONFIG/config.json`, else
`~/.docker/config.json`). A registry's credentials come, in docker's order, from
`credHelpers[<host>]`, else the `credsStore` helper, else `auths[<key>]`
(base64 `auth` or `username`/`password`). Helpers are the real
`docker-credential-<name>` programs, spoken to over stdin/stdout as docker does.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazyoci.errors import AuthError, ConfigError
from lazyoci.oci.reference import DEFAULT_REGISTRY

# docker.io credentials live under the legacy v1 index URL; every docker tool reads them there.
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_HUB_NAMES = {DEFAULT_REGISTRY, "index.docker.io", "registry-1.docker.io"}


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print secrets in tracebacks or logs
        return f"Credentials(username={self.username!r}, password=***)"


def default_config_path() -> Path:
    env = os.environ.get("DOCKER_CONFIG")
    base = Path(env) if env else Path.home() / ".docker"
    return base / "config.json"


def registry_host(text: str) -> str:
    """`https://host:5000/v1/` or `host:5000` -> `host:5000`; any docker hub name -> `docker.io`."""
    host = text.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0]
    return DEFAULT_REGISTRY if host in _HUB_NAMES else host


def config_key(registry: str) -> str:
    """The `auths` key docker writes for a registry."""
    host = registry_host(registry)
    return DOCKER_HUB_KEY if host == DEFAULT_REGISTRY else host


class DockerConfig:
    """Reads and writes one docker config file; every call re-reads it (other tools edit it too)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_config_path()

    def _load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot read docker config: {e.strerror}") from None
        if not text.strip():
            return {}
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{self.path}: invalid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{self.path}: the docker config must be a JSON object")
        return doc

    def _save(self, doc: dict[str, Any]) -> None:
        # Atomic replace with mode 0600: the file holds secrets and may be read concurrently.
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent="\t")
                f.write("\n")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _helper_for(self, doc: dict[str, Any], host: str) -> str | None:
        helpers = doc.get("credHelpers") or {}
        if isinstance(helpers, dict):
            for key, name in helpers.items():
                if registry_host(key) == host and isinstance(name, str) and name:
                    return name
        store = doc.get("credsStore")
        return store if isinstance(store, str) and store else None

    def get(self, registry: str) -> Credentials | None:
        """The credentials for `registry` (host[:port] or URL), or None for anonymous access."""
        host = registry_host(registry)
        doc = self._load()
        helper = self._helper_for(doc, host)
        if helper:
            creds = _helper_get(helper, config_key(host))
            if creds is not None:
                return creds
        auths = doc.get("auths") or {}
        if not isinstance(auths, dict):
            raise ConfigError(f"{self.path}: 'auths' must be an object")
        for key, entry in auths.items():
            if registry_host(key) == host and isinstance(entry, dict):
                creds = _decode_entry(entry, self.path, key)
                if creds is not None:
                    return creds
        return None

    def store(self, registry: str, username: str, password: str) -> None:
        """Save credentials as docker login does: through the helper if one is set, else in `auths`."""
        host = registry_host(registry)
        doc = self._load()
        helper = self._helper_for(doc, host)
        if helper:
            _helper_run(helper, "store", json.dumps(
                {"ServerURL": config_key(host), "Username": username, "Secret": password}))
            return
        auths = doc.setdefault("auths", {})
        for key in [k for k in auths if registry_host(k) == host]:
            del auths[key]
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        auths[config_key(host)] = {"auth": token}
        self._save(doc)

    def erase(self, registry: str) -> bool:
        """Forget the credentials of `registry`; True if there were any."""
        host = registry_host(registry)
        doc = self._load()
        found = False
        helper = self._helper_for(doc, host)
        if helper:
            found = _helper_get(helper, config_key(host)) is not None
            if found:
                _helper_run(helper, "erase", config_key(host))
        auths = doc.get("auths") or {}
        keys = [k for k in auths if registry_host(k) == host]
        for key in keys:
            del auths[key]
        if keys:
            self._save(doc)
        return found or bool(keys)


def _decode_entry(entry: dict[str, Any], path: Path, key: str) -> Credentials | None:
    if entry.get("auth"):
        try:
            user, colon, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            colon = ""
        if not colon:
            raise ConfigError(f"{path}: auths[{key!r}].auth is not base64 'user:password'")
        return Credentials(user, password)
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]))
    if entry.get("identitytoken"):
        # An OAuth refresh token: docker sends it as the password of user "<token>".
        return Credentials("<token>", str(entry["identitytoken"]))
    return None


def _helper_run(helper: str, action: str, stdin: str) -> str:
    program = f"docker-credential-{helper}"
    try:
        proc = subprocess.run([program, action], input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise ConfigError(f"credential helper {program} is configured but not installed") from None
    except PermissionError:     # not found, and a directory of PATH was closed to this user
        raise ConfigError(f"credential helper {program} is configured but cannot be run "
                          "(not installed, or not executable by this user)") from None
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {program} {action} timed out") from None
    if proc.returncode != 0:
        msg = (proc.stdout.strip() or proc.stderr.strip() or f"exit status {proc.returncode}")
        raise _HelperError(f"credential helper {program} {action} failed: {msg}")
    return proc.stdout


class _HelperError(AuthError):
    pass


def _helper_get(helper: str, server_url: str) -> Credentials | None:
    try:
        out = _helper_run(helper, "get", server_url)
    except _HelperError as e:
        # The helpers' protocol reports a missing entry as a failure with this text.
        if "credentials not found" in str(e).lower():
            return None
        raise
    try:
        doc = json.loads(out)
        user, secret = doc.get("Username", ""), doc.get("Secret", "")
    except (ValueError, AttributeError):
        raise AuthError(f"credential helper docker-credential-{helper} printed invalid JSON") from None
    if not secret:
        return None
    return Credentials(user or "<token>", secret)
