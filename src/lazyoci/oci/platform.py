"""Platforms (os/arch/variant) and choosing a manifest from an index."""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass

from lazyoci.errors import ConfigError, FormatError

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386",
         "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"invalid platform {text!r}: want os/arch[/variant]")
        arch = _ARCH.get(parts[1], parts[1])
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> "Platform":
        machine = _platform.machine()
        arch = _ARCH.get(machine, machine)
        variant = "v8" if arch == "arm64" else ("v7" if machine == "armv7l" else None)
        return cls("linux", arch, variant)

    @classmethod
    def from_json(cls, obj: dict) -> "Platform":
        os_, arch, variant = obj.get("os") or "", obj.get("architecture") or "", obj.get("variant") or None
        if not isinstance(os_, str) or not isinstance(arch, str) or not isinstance(variant, str | None):
            raise FormatError(f"platform {obj!r} has a field that is not a string")
        return cls(os_, arch, variant)

    def to_json(self) -> dict:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def matches(self, other: "Platform") -> bool:
        """Does an index entry `other` serve this wanted platform?

        A variant we do not ask for matches any; arm64 treats a missing variant as v8.
        """
        if self.os != other.os or self.architecture != other.architecture:
            return False
        if self.variant is None or other.variant is None:
            return self.variant in (None, "v8") and other.variant in (None, "v8") or self.variant is None
        return self.variant == other.variant

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")
