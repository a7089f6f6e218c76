"""Content digests: parsing, computing, and verifying while streaming."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from lazyoci.errors import FormatError, IntegrityError

_DIGEST_RE = re.compile(r"^(sha256):([a-f0-9]{64})$|^(sha512):([a-f0-9]{128})$")


@dataclass(frozen=True, order=True)
class Digest:
    """An OCI content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> "Digest":
        m = _DIGEST_RE.match(text)
        if not m:
            raise FormatError(f"invalid digest {text!r}")
        if m.group(1):
            return cls(m.group(1), m.group(2))
        return cls(m.group(3), m.group(4))

    @classmethod
    def of(cls, data: bytes) -> "Digest":
        return cls("sha256", hashlib.sha256(data).hexdigest())

    def hasher(self) -> "hashlib._Hash":
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        """The 12-hex-digit form docker shows as IMAGE ID."""
        return self.hex[:12]


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` string of some bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_bytes(data: bytes, expected: str | Digest, what: str = "content") -> None:
    """Raise IntegrityError unless `data` hashes to `expected`."""
    d = expected if isinstance(expected, Digest) else Digest.parse(expected)
    actual = hashlib.new(d.algorithm, data).hexdigest()
    if actual != d.hex:
        raise IntegrityError(
            f"digest mismatch for {what}: expected {d}, got {d.algorithm}:{actual}",
            expected=str(d),
            actual=f"{d.algorithm}:{actual}",
        )


class DigestVerifier:
    """Hashes a stream as it passes and checks size and digest at the end."""

    def __init__(self, expected: str | Digest, size: int | None = None, what: str = "blob"):
        self.expected = expected if isinstance(expected, Digest) else Digest.parse(expected)
        self.size = size
        self.what = what
        self._h = self.expected.hasher()
        self.count = 0

    def update(self, chunk: bytes) -> None:
        self._h.update(chunk)
        self.count += len(chunk)
        if self.size is not None and self.count > self.size:
            raise IntegrityError(
                f"{self.what} {self.expected}: more than the expected {self.size} bytes",
                expected=str(self.expected),
            )

    def finish(self) -> None:
        if self.size is not None and self.count != self.size:
            raise IntegrityError(
                f"{self.what} {self.expected}: got {self.count} bytes, expected {self.size} (truncated?)",
                expected=str(self.expected),
            )
        actual = self._h.hexdigest()
        if actual != self.expected.hex:
            raise IntegrityError(
                f"digest mismatch for {self.what}: expected {self.expected}, got {self.expected.algorithm}:{actual}",
                expected=str(self.expected),
                actual=f"{self.expected.algorithm}:{actual}",
            )
