"""Image references, normalised as docker does.

``ubuntu`` → ``docker.io/library/ubuntu:latest``; ``localhost:5000/app@sha256:…``
keeps its registry and digest. The grammar is distribution's reference grammar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lazyoci.errors import ReferenceError_

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
# docker.io is served by this host; credentials are stored under the legacy key.
DOCKER_HUB_HOST = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_RE = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$"
)
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-fA-F0-9]{32,}$")


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: registry, repository, and tag and/or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Reference":
        """Parse and normalise a reference; raise ReferenceError_ when malformed."""
        original = text
        if not text or text != text.strip() or len(text) > 4096:
            raise ReferenceError_(f"invalid reference format: {original!r}")
        digest = None
        if "@" in text:
            text, digest = text.split("@", 1)
            if not _DIGEST_RE.match(digest):
                raise ReferenceError_(f"invalid reference format: bad digest in {original!r}")
        tag = None
        last = text.rsplit("/", 1)[-1]
        if ":" in last:
            text, tag = text.rsplit(":", 1)
            if not _TAG_RE.match(tag):
                raise ReferenceError_(f"invalid reference format: bad tag in {original!r}")
        first, sep, rest = text.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, path = first, rest
            if not _DOMAIN_RE.match(registry):
                raise ReferenceError_(f"invalid reference format: bad registry in {original!r}")
        else:
            registry, path = DEFAULT_REGISTRY, text
        if registry in ("index.docker.io", "registry-1.docker.io"):
            registry = DEFAULT_REGISTRY
        if registry == DEFAULT_REGISTRY and "/" not in path:
            path = "library/" + path
        if not _PATH_RE.match(path):
            if path.lower() != path and _PATH_RE.match(path.lower()):
                raise ReferenceError_(
                    f"invalid reference format: repository name must be lowercase: {original!r}"
                )
            raise ReferenceError_(f"invalid reference format: {original!r}")
        if len(registry) + 1 + len(path) > 255:
            raise ReferenceError_(f"invalid reference format: name too long: {original!r}")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, path, tag, digest)

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host:port whose /v2/ API serves this registry."""
        return DOCKER_HUB_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.registry, self.repository, self.tag, digest)

    def with_tag(self, tag: str) -> "Reference":
        return Reference(self.registry, self.repository, tag, None)

    @property
    def object(self) -> str:
        """What the manifests endpoint is asked for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def familiar(self) -> str:
        """The short form docker prints (``ubuntu:latest`` for docker.io/library/ubuntu)."""
        name = self.name
        if self.registry == DEFAULT_REGISTRY:
            name = self.repository.removeprefix("library/")
        out = name
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out


def is_loopback_registry(host: str) -> bool:
    """Loopback registries use plain HTTP without a flag, as nerdctl does."""
    h = host
    if h.startswith("["):
        h = h[1 : h.index("]")]
    else:
        h = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    return h == "localhost" or h == "::1" or h.startswith("127.")
