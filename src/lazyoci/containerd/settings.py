"""The config file's `containerd:` section: what the service offers containerd.

    containerd:
      snapshotters:                 # the name in containerd's [proxy_plugins.NAME] -> lazyoci snapshotter
        soci: soci
        lazyoci-overlayfs: overlayfs
      remote_snapshots: true        # false: soci never answers a Prepare with a lazy layer

containerd puts the proxy plugin's name in every request, so one socket serves each
named snapshotter. The defaults are those above (containerd's built-in `overlayfs`
keeps its name; lazyoci's is `lazyoci-overlayfs` unless configured otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazyoci.errors import ConfigError

__all__ = ["ContainerdConfig", "parse_containerd"]

_SNAPSHOTTERS = ("overlayfs", "soci")


def _default_names() -> dict[str, str]:
    return {"soci": "soci", "lazyoci-overlayfs": "overlayfs"}


@dataclass(frozen=True)
class ContainerdConfig:
    snapshotters: dict[str, str] = field(default_factory=_default_names)
    remote_snapshots: bool = True


def parse_containerd(doc: Any, path: Path, line: object) -> ContainerdConfig:
    """The `containerd:` mapping of the config file at `path` (`line`: where it starts)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}:{line}: containerd must be a mapping")
    lines = doc.get("__lines__", {})
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "__lines__":
            continue
        where = f"{path}:{lines.get(key, line)}"
        if key == "snapshotters":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: containerd.snapshotters must map names to snapshotters")
            names = {}
            for name, snap in value.items():
                if name == "__lines__":
                    continue
                if not isinstance(name, str) or not name or snap not in _SNAPSHOTTERS:
                    raise ConfigError(f"{where}: containerd.snapshotters: {name!r}: {snap!r} is not one of "
                                      f"{', '.join(_SNAPSHOTTERS)}")
                names[name] = snap
            out["snapshotters"] = names
        elif key == "remote_snapshots":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: containerd.remote_snapshots must be true or false")
            out["remote_snapshots"] = value
        else:
            raise ConfigError(f"{where}: unknown containerd setting {key!r} (known: snapshotters, remote_snapshots)")
    return ContainerdConfig(**out)
