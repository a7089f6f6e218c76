"""The config file (Finch's schema) and the settings passed down from it.

    snapshotters:          # first = default for pull, run and image mount
      - soci
    runtime: runc          # or crun
    insecure_registries: [myreg.local:5000]
    registry_mirrors:      # containerd hosts.toml ideas: mirrors tried in order, then upstream
      docker.io: ["http://127.0.0.1:5001"]
    soci:
      cache_dir: /var/lib/lazyoci/soci/cache
      cache_max_bytes: 0            # 0 = no limit
      fetch_timeout_seconds: 30     # a span fetch fails (EIO) after this, retries included; 0 = never
      fetch_min_bytes_per_second: 16384   # slower over a whole window: retried; 0 = no minimum
      fetch_rate_window_seconds: 5  # that window (also the longest wait for a first byte)
      background_fetch: true
      background_quiet_seconds: 30
      background_interval_ms: 500
      verify: true

Values are checked when read: a bad value is a ConfigError naming the file and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lazyoci.errors import ConfigError

SNAPSHOTTERS = ("overlayfs", "soci")
RUNTIMES = ("runc", "crun")


def default_root() -> Path:
    env = os.environ.get("LAZYOCI_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/lazyoci")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "lazyoci"


def default_config_path() -> Path:
    env = os.environ.get("LAZYOCI_CONFIG")
    return Path(env) if env else Path.home() / ".lazyoci" / "config.yaml"


@dataclass(frozen=True)
class SociConfig:
    cache_dir: Path | None = None          # None: <root>/soci/cache
    cache_max_bytes: int = 0
    fetch_timeout_seconds: float = 30.0     # = registry.options.RANGE_LIMITS; 0: no deadline
    fetch_min_bytes_per_second: int = 16384
    fetch_rate_window_seconds: float = 5.0
    background_fetch: bool = True
    background_quiet_seconds: float = 30.0
    background_interval_ms: int = 500
    verify: bool = True


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    snapshotters: tuple[str, ...] = ()
    runtime: str = "runc"
    insecure_registries: tuple[str, ...] = ()
    registry_mirrors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    soci: SociConfig = SociConfig()

    @property
    def default_snapshotter(self) -> str:
        return self.snapshotters[0] if self.snapshotters else "overlayfs"


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers each mapping key's line, for error messages."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    out = {}
    lines = {}
    for k_node, v_node in node.value:
        key = loader.construct_object(k_node, deep=True)
        out[key] = loader.construct_object(v_node, deep=True)
        lines[key] = k_node.start_mark.line + 1
        if isinstance(v_node, yaml.SequenceNode):
            lines[(key, "items")] = [n.start_mark.line + 1 for n in v_node.value]
    out["__lines__"] = lines
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k != "__lines__"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def load_config(path: Path | None = None) -> Config:
    """Read the config file; a missing file gives the defaults."""
    path = path or default_config_path()
    if not path.exists():
        return Config(path=None)
    try:
        doc = yaml.load(path.read_text(), Loader=_LineLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if doc is None:
        return Config(path=path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the config must be a mapping")
    lines = doc.get("__lines__", {})

    def where(key: str) -> str:
        return f"{path}:{lines.get(key, '?')}"

    snaps = doc.get("snapshotters") or []
    if isinstance(snaps, str):
        snaps = [snaps]
    if not isinstance(snaps, list):
        raise ConfigError(f"{where('snapshotters')}: snapshotters must be a list")
    item_lines = lines.get(("snapshotters", "items"), [])
    for i, s in enumerate(snaps):
        if s not in SNAPSHOTTERS:
            line = item_lines[i] if i < len(item_lines) else lines.get("snapshotters", "?")
            raise ConfigError(
                f"{path}:{line}: unknown snapshotter {s!r} (supported: {', '.join(SNAPSHOTTERS)})"
            )
    runtime = doc.get("runtime", "runc")
    if runtime not in RUNTIMES:
        raise ConfigError(f"{where('runtime')}: unknown runtime {runtime!r} (supported: runc, crun)")
    insecure = doc.get("insecure_registries") or []
    if not isinstance(insecure, list) or not all(isinstance(x, str) for x in insecure):
        raise ConfigError(f"{where('insecure_registries')}: insecure_registries must be a list of hosts")
    mirrors_raw = _strip(doc.get("registry_mirrors") or {})
    if not isinstance(mirrors_raw, dict):
        raise ConfigError(f"{where('registry_mirrors')}: registry_mirrors must map a registry to a list of URLs")
    mirrors: dict[str, tuple[str, ...]] = {}
    for host, urls in mirrors_raw.items():
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not all(isinstance(u, str) and "://" in u for u in urls):
            raise ConfigError(f"{where('registry_mirrors')}: mirrors of {host!r} must be a list of URLs")
        mirrors[str(host)] = tuple(urls)
    soci_doc = doc.get("soci") or {}
    if not isinstance(soci_doc, dict):
        raise ConfigError(f"{where('soci')}: soci must be a mapping")
    soci = _parse_soci(soci_doc, path)
    return Config(
        path=path,
        snapshotters=tuple(snaps),
        runtime=runtime,
        insecure_registries=tuple(insecure),
        registry_mirrors=mirrors,
        soci=soci,
    )


def _parse_soci(doc: dict, path: Path) -> SociConfig:
    lines = doc.get("__lines__", {})
    known = {
        "fetch_timeout_seconds": (int, float), "fetch_min_bytes_per_second": int,
        "fetch_rate_window_seconds": (int, float),
        "cache_dir": str, "cache_max_bytes": int, "background_fetch": bool,
        "background_quiet_seconds": (int, float), "background_interval_ms": int, "verify": bool,
    }
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "__lines__":
            continue
        if key not in known:
            raise ConfigError(f"{path}:{lines.get(key, '?')}: unknown soci setting {key!r}")
        want = known[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{path}:{lines.get(key, '?')}: soci.{key} has the wrong type")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{path}:{lines.get(key, '?')}: soci.{key} must not be negative")
        if key == "fetch_rate_window_seconds" and value == 0:
            raise ConfigError(f"{path}:{lines.get(key, '?')}: soci.{key} must be more than 0")
        values[key] = Path(value) if key == "cache_dir" else value
    return SociConfig(**values)
