"""The config file (Finch's schema) and the settings passed down from it.

    snapshotters:          # first = default for pull, run and image mount
      - soci
    runtime: runc          # or crun
    insecure_registries: [myreg.local:5000]
    unpack_sync_fs: false  # flush each unpacked layer to disk before its snapshot is committed
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
      unpack_complete_layers: true  # a layer whole in the span cache is unpacked for new containers
    containerd:            # the service's snapshotters for containerd (lazyoci/containerd/settings.py)
      snapshotters: {soci: soci, lazyoci-overlayfs: overlayfs}

Values are checked when read: a bad value is a ConfigError naming the file and line.
Verification of lazily served bytes cannot be turned off: `soci.verify: false` is
an error (`verify: true`, which older configs carry, says what always holds).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazyoci.containerd.settings import ContainerdConfig, parse_containerd
from lazyoci.errors import ConfigError

if TYPE_CHECKING:
    import yaml

SNAPSHOTTERS = ("overlayfs", "soci", "stargz")   # stargz: nerdctl's name; the layers' own indexes only
RUNTIMES = ("runc", "crun")
TOP_LEVEL_KEYS = ("snapshotters", "runtime", "insecure_registries", "unpack_sync_fs", "registry_mirrors", "soci",
                  "containerd")
PULL_POLICIES = ("missing", "always", "never")   # `run --pull`


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
    # once every span of a layer is cached, unpack it (verified against its diff ID) so that new
    # containers stack it as overlayfs does, with no FUSE request per file; costs its size on disk
    unpack_complete_layers: bool = True


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    snapshotters: tuple[str, ...] = ()
    runtime: str = "runc"
    insecure_registries: tuple[str, ...] = ()
    registry_mirrors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # syncfs after each layer a pull unpacks, before its snapshot is committed: a power loss then
    # never leaves a committed layer of empty files (containerd's image_pull_with_sync_fs, also
    # off by default: it costs the pull the disk's write time)
    unpack_sync_fs: bool = False
    soci: SociConfig = SociConfig()
    containerd: ContainerdConfig = ContainerdConfig()     # what the service offers containerd

    @property
    def default_snapshotter(self) -> str:
        return self.snapshotters[0] if self.snapshotters else "overlayfs"


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    import yaml

    out: dict[object, object] = {}
    lines: dict[object, object] = {}
    for k_node, v_node in node.value:
        key = loader.construct_object(k_node, deep=True)
        if not isinstance(key, (str, int, float, bool)):
            raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value", k_node.start_mark)
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", k_node.start_mark)
        out[key] = loader.construct_object(v_node, deep=True)
        lines[key] = k_node.start_mark.line + 1
        if isinstance(v_node, yaml.SequenceNode):
            lines[(key, "items")] = [n.start_mark.line + 1 for n in v_node.value]
    out["__lines__"] = lines
    return out


@functools.cache
def _line_loader() -> type:
    """A YAML loader that remembers each mapping key's line, for error messages.

    Made on first use: PyYAML is imported only when there is a config file to read.
    """
    import yaml

    class _LineLoader(yaml.SafeLoader):
        pass

    _LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    return _LineLoader


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k != "__lines__"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def load_config(path: Path | None = None, kept: Path | None = None) -> Config:
    """Read the config file; a missing default file gives the defaults.

    An unknown or repeated key, a value of the wrong type, bytes that are not UTF-8
    or YAML that does not parse is one ConfigError naming the file and line. A file
    named explicitly (`--config`, LAZYOCI_CONFIG) must exist. `kept`: where the parsed
    document is kept for the next command (lazyoci/config_documents.py), None: parse."""
    explicit = path is not None or bool(os.environ.get("LAZYOCI_CONFIG"))
    path = path or default_config_path()
    if not path.exists():
        if explicit:
            raise ConfigError(f"{path}: no such config file")
        return Config(path=None)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    doc = _document(path, text, kept)
    if doc is None:
        return Config(path=path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the config must be a mapping")
    lines = doc.get("__lines__", {})

    def where(key: str) -> str:
        return f"{path}:{lines.get(key, '?')}"

    for key in doc:
        if key != "__lines__" and key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{where(key)}: unknown setting {key!r} "
                              f"(known: {', '.join(TOP_LEVEL_KEYS)})")
    snaps = _default_if_unset(doc, "snapshotters", [])
    if not isinstance(snaps, list):
        raise ConfigError(f"{where('snapshotters')}: snapshotters must be a list")
    item_lines = lines.get(("snapshotters", "items"), [])
    for i, s in enumerate(snaps):
        if s not in SNAPSHOTTERS:
            line = item_lines[i] if i < len(item_lines) else lines.get("snapshotters", "?")
            raise ConfigError(
                f"{path}:{line}: unknown snapshotter {s!r} (supported: {', '.join(SNAPSHOTTERS)})"
            )
    runtime = _default_if_unset(doc, "runtime", "runc")
    if runtime not in RUNTIMES:
        raise ConfigError(f"{where('runtime')}: unknown runtime {runtime!r} (supported: runc, crun)")
    insecure = _default_if_unset(doc, "insecure_registries", [])
    if not isinstance(insecure, list) or not all(isinstance(x, str) for x in insecure):
        raise ConfigError(f"{where('insecure_registries')}: insecure_registries must be a list of hosts")
    sync_fs = _default_if_unset(doc, "unpack_sync_fs", False)
    if not isinstance(sync_fs, bool):
        raise ConfigError(f"{where('unpack_sync_fs')}: unpack_sync_fs must be true or false")
    mirrors_doc = _default_if_unset(doc, "registry_mirrors", {})
    if not isinstance(mirrors_doc, dict):
        raise ConfigError(f"{where('registry_mirrors')}: registry_mirrors must map a registry to a list of URLs")
    host_lines = mirrors_doc.get("__lines__", {})
    mirrors: dict[str, tuple[str, ...]] = {}
    for host, urls in _strip(mirrors_doc).items():
        if not isinstance(urls, list) or not all(isinstance(u, str) and "://" in u for u in urls):
            raise ConfigError(f"{path}:{host_lines.get(host, '?')}: mirrors of {host!r} must be a list of URLs")
        mirrors[str(host)] = tuple(urls)
    soci_doc = _default_if_unset(doc, "soci", {})
    if not isinstance(soci_doc, dict):
        raise ConfigError(f"{where('soci')}: soci must be a mapping")
    soci = _parse_soci(soci_doc, path)
    containerd = parse_containerd(_default_if_unset(doc, "containerd", {}), path, lines.get("containerd", "?"))
    return Config(
        path=path,
        snapshotters=tuple(snaps),
        runtime=runtime,
        insecure_registries=tuple(insecure),
        registry_mirrors=mirrors,
        unpack_sync_fs=sync_fs,
        soci=soci,
        containerd=containerd,
    )


def _document(path: Path, text: str, kept: Path | None) -> Any:
    """The YAML document of the config file's `text`: the kept one for this very text, else parsed
    (and kept for the next command)."""
    if kept is not None:
        from lazyoci.config_documents import kept_document

        doc = kept_document(kept, text)
        if doc is not None:
            return doc
    import yaml

    try:
        doc = yaml.load(text, Loader=_line_loader())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}:{_yaml_error_line(e)}: invalid YAML: {_yaml_problem(e)}") from None
    if kept is not None and isinstance(doc, dict):
        from lazyoci.config_documents import keep_document

        keep_document(kept, text, doc)
    return doc


def _default_if_unset(doc: dict, key: str, default: Any) -> Any:
    """The value of `key`; an absent key or an empty YAML value (`key:`) means the default."""
    value = doc.get(key)
    return default if value is None else value


def _yaml_error_line(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return str(mark.line + 1) if mark is not None else "?"


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's message without its multi-line excerpt of the file."""
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    if problem:
        return f"{context}, {problem}" if context else problem
    return str(e).splitlines()[0]


def _parse_soci(doc: dict, path: Path) -> SociConfig:
    lines = doc.get("__lines__", {})
    known: dict[str, type | tuple[type, ...]] = {
        "fetch_timeout_seconds": (int, float), "fetch_min_bytes_per_second": int,
        "fetch_rate_window_seconds": (int, float),
        "cache_dir": str, "cache_max_bytes": int, "background_fetch": bool,
        "background_quiet_seconds": (int, float), "background_interval_ms": int,
        "unpack_complete_layers": bool,
    }
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "__lines__":
            continue
        if key == "verify":
            if value is not True:
                raise ConfigError(f"{path}:{lines.get(key, '?')}: soci.verify: lazyoci always verifies what it "
                                  f"serves lazily; verification cannot be turned off (remove the setting)")
            continue
        if key not in known:
            raise ConfigError(f"{path}:{lines.get(key, '?')}: unknown soci setting {key!r}")
        want = known[key]
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise ConfigError(f"{path}:{lines.get(key, '?')}: soci.{key} has the wrong type")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{path}:{lines.get(key, '?')}: soci.{key} must not be negative")
        if key == "fetch_rate_window_seconds" and value == 0:
            raise ConfigError(f"{path}:{lines.get(key, '?')}: soci.{key} must be more than 0")
        values[key] = Path(value) if isinstance(value, str) and key == "cache_dir" else value
    return SociConfig(**values)
