"""Volumes and mounts of `run`: `-v`, `--mount`, `--tmpfs`, and named volumes under the data root.

A named volume is a directory `<root>/volumes/<name>/_data` (docker's layout) with its
creation time and labels in `<name>/meta.json`; `volumes/` itself is 0700, so no user
but root has a path into a volume. A flag is parsed into a `MountRequest` and turned
into the runtime spec's mounts only when the container is created; every bad flag is
one `ConfigError` before anything exists.

The container side of a mount is kept inside the container's root filesystem by the
runtime (runc resolves the destination's symlinks within the rootfs); a `..` in it is
refused here, so the path written is the path meant. As in docker, an empty volume
mounted over a directory of the image is first filled with that directory's content
(`cp -a`, the path resolved inside the rootfs; `nocopy` skips it).
"""

from __future__ import annotations

import builtins
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lazyoci.errors import ConfigError, ContainerError
from lazyoci.runtime.bundle import resolve_in_root
from lazyoci.store.layout import DataRoot
from lazyoci.store.modes import private_dir, write_file

MOUNT_TYPES = ("bind", "volume", "tmpfs")
DATA_DIR_MODE = 0o755           # a volume's _data, as docker makes it
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*\Z")
_VOLUME_FLAG_OPTIONS = {"ro", "rw", "z", "Z", "nocopy"}      # z/Z (SELinux labels) mean nothing here: accepted


@dataclass(frozen=True)
class MountRequest:
    """One mount asked for on the command line, before anything is created."""

    type: str                       # bind | volume | tmpfs
    target: str                     # absolute path inside the container
    source: str = ""                # host path (bind), volume name (volume; "" = anonymous), unused (tmpfs)
    readonly: bool = False
    create_source: bool = False     # -v creates a missing host directory, --mount refuses it
    copy_image_content: bool = True  # an empty volume gets the image's content at target (not: nocopy)
    tmpfs_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Volume:
    name: str
    mountpoint: Path
    created: float
    labels: dict[str, str] = field(default_factory=dict)
    anonymous: bool = False


def _target(text: str, flag: str) -> str:
    if not text.startswith("/"):
        raise ConfigError(f"invalid {flag} {text!r}: the container path must be absolute")
    parts = text.split("/")
    if ".." in parts:
        raise ConfigError(f"invalid {flag} {text!r}: the container path may not contain '..'")
    clean = "/" + "/".join(p for p in parts if p not in ("", "."))
    if clean == "/":
        raise ConfigError(f"invalid {flag} {text!r}: cannot mount over the container's root")
    return clean


def _volume_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"invalid volume name {name!r} in {what}: use [a-zA-Z0-9][a-zA-Z0-9_.-]*")
    return name


def parse_volume_flag(text: str) -> MountRequest:
    """docker's `-v HOST:CONTAINER[:ro]`, `-v NAME:CONTAINER[:ro]` or `-v CONTAINER` (anonymous volume).

    A host path is absolute, or starts with `.` (relative to the current directory, as docker's
    CLI takes it); anything else is a volume name."""
    fields = text.split(":")
    if len(fields) == 1:
        return MountRequest("volume", _target(fields[0], "-v"))
    if len(fields) > 3 or not fields[0]:
        raise ConfigError(f"invalid -v {text!r}: use HOST-PATH:CONTAINER-PATH[:ro] or NAME:CONTAINER-PATH[:ro]")
    opts: list[str] = []
    if len(fields) == 3:
        opts = fields[2].split(",")
        unknown = [o for o in opts if o not in _VOLUME_FLAG_OPTIONS]
        if unknown:
            raise ConfigError(f"invalid -v {text!r}: unknown option {unknown[0]!r} (known: ro, rw, nocopy)")
    readonly = "ro" in opts
    source, target = fields[0], _target(fields[1], "-v")
    if source.startswith(("/", "./", "../")) or source in (".", ".."):
        return MountRequest("bind", target, os.path.abspath(source), readonly, create_source=True)
    return MountRequest("volume", target, _volume_name(source, "-v"), readonly,
                        copy_image_content="nocopy" not in opts)


def parse_mount_flag(text: str) -> MountRequest:
    """docker's `--mount type=bind|volume|tmpfs,source=...,target=...[,readonly][,tmpfs-size=N][,tmpfs-mode=M]`."""
    values: dict[str, str] = {}
    readonly = False
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key == "volume-nocopy":
            values[key] = value or "true"
            continue
        if key in ("readonly", "ro"):
            if sep and value not in ("true", "false", "1", "0"):
                raise ConfigError(f"invalid --mount {text!r}: readonly takes true or false, not {value!r}")
            readonly = not sep or value in ("true", "1")
            continue
        if not sep:
            raise ConfigError(f"invalid --mount {text!r}: {item!r} is not KEY=VALUE")
        key = {"src": "source", "destination": "target", "dst": "target"}.get(key, key)
        if key not in ("type", "source", "target", "tmpfs-size", "tmpfs-mode"):
            raise ConfigError(f"invalid --mount {text!r}: unknown key {key!r}")
        if key in values:
            raise ConfigError(f"invalid --mount {text!r}: {key} given twice")
        values[key] = value
    kind = values.get("type", "volume")
    if kind not in MOUNT_TYPES:
        raise ConfigError(f"invalid --mount {text!r}: type must be one of {', '.join(MOUNT_TYPES)}, not {kind!r}")
    if "target" not in values:
        raise ConfigError(f"invalid --mount {text!r}: target is required")
    target = _target(values["target"], "--mount")
    source = values.get("source", "")
    if kind != "tmpfs" and any(k.startswith("tmpfs-") for k in values):
        raise ConfigError(f"invalid --mount {text!r}: tmpfs options are only for type=tmpfs")
    if kind == "bind":
        if not source.startswith("/"):
            raise ConfigError(f"invalid --mount {text!r}: a bind source must be an absolute host path")
        return MountRequest("bind", target, os.path.normpath(source), readonly)
    if kind != "volume" and "volume-nocopy" in values:
        raise ConfigError(f"invalid --mount {text!r}: volume-nocopy is only for type=volume")
    if kind == "volume":
        return MountRequest("volume", target, _volume_name(source, "--mount") if source else "", readonly,
                            copy_image_content=values.get("volume-nocopy", "false") not in ("true", "1"))
    if source:
        raise ConfigError(f"invalid --mount {text!r}: a tmpfs has no source")
    opts = []
    if "tmpfs-size" in values:
        opts.append(f"size={parse_bytes(values['tmpfs-size'], '--mount tmpfs-size')}")
    if "tmpfs-mode" in values:
        mode = values["tmpfs-mode"]
        if not re.fullmatch(r"[0-7]{1,4}", mode):
            raise ConfigError(f"invalid --mount {text!r}: tmpfs-mode must be octal, not {mode!r}")
        opts.append(f"mode={mode}")
    return MountRequest("tmpfs", target, readonly=readonly, tmpfs_options=tuple(opts))


_TMPFS_OPTIONS = re.compile(r"(ro|rw|exec|noexec|suid|nosuid|dev|nodev|size=\d+[kmgKMG]?|mode=[0-7]{1,4}|"
                            r"uid=\d+|gid=\d+|nr_inodes=\d+[kmgKMG]?)\Z")


def parse_tmpfs_flag(text: str) -> MountRequest:
    """docker's `--tmpfs /path[:options]` (mount(8) options of tmpfs)."""
    path, _, opts = text.partition(":")
    options = [o for o in opts.split(",") if o] if opts else []
    for o in options:
        if not _TMPFS_OPTIONS.match(o):
            raise ConfigError(f"invalid --tmpfs {text!r}: unknown option {o!r}")
    return MountRequest("tmpfs", _target(path, "--tmpfs"), readonly="ro" in options,
                        tmpfs_options=tuple(o for o in options if o not in ("ro", "rw")))


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str, flag: str) -> int:
    """docker's sizes: a number of bytes with an optional b/k/m/g/t suffix (powers of 1024)."""
    m = re.fullmatch(r"(\d+)([bkmgtBKMGT]?)", text.strip())
    if m is None or int(m.group(1)) == 0:
        raise ConfigError(f"invalid {flag} {text!r}: use a positive number of bytes with an optional "
                          "b, k, m, g suffix")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def check_unique_targets(requests: list[MountRequest], reserved: tuple[str, ...] = ()) -> None:
    """docker refuses two mounts at one container path, and a mount over a file it generates."""
    seen: set[str] = set()
    for r in requests:
        if r.target in seen:
            raise ConfigError(f"duplicate mount point: {r.target}")
        if r.target in reserved:
            raise ConfigError(f"cannot mount over {r.target}: lazyoci generates it")
        seen.add(r.target)


class VolumeStore:
    """Named volumes of one data root."""

    def __init__(self, root: DataRoot) -> None:
        self.root = root
        self.dir = root.path / "volumes"

    def _ensure_dir(self) -> None:
        private_dir(self.dir)

    def create(self, name: str | None = None, labels: dict[str, str] | None = None) -> Volume:
        """A new volume (an existing one of that name is returned as it is, as docker does)."""
        anonymous = name is None
        name = secrets.token_hex(32) if name is None else _volume_name(name, "volume create")
        existing = self.try_get(name)
        if existing is not None:
            return existing
        self._ensure_dir()
        vdir = self.dir / name
        tmp = private_dir(self.dir / f".{name}.{secrets.token_hex(4)}.new")
        # The container's own user, maybe not root, uses _data: 0755 like docker's, reachable
        # only through the 0700 directories above it.
        private_dir(tmp / "_data", DATA_DIR_MODE)
        meta = {"created": time.time(), "labels": dict(labels or {}), "anonymous": anonymous}
        write_file(tmp / "meta.json", json.dumps(meta).encode())
        try:
            os.rename(tmp, vdir)
        except OSError:            # created by someone else meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        return self.get(name)

    def try_get(self, name: str) -> Volume | None:
        vdir = self.dir / name
        try:
            meta = json.loads((vdir / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or not isinstance(meta.get("labels", {}), dict):
            return None
        return Volume(name, vdir / "_data", float(meta.get("created", 0)), dict(meta.get("labels", {})),
                      bool(meta.get("anonymous", False)))

    def get(self, name: str) -> Volume:
        vol = self.try_get(name) if _NAME.match(name) else None
        if vol is None:
            raise ContainerError(f"no such volume: {name}")
        return vol

    def list(self) -> list[Volume]:
        if not self.dir.is_dir():
            return []
        vols = [self.try_get(p.name) for p in sorted(self.dir.iterdir()) if _NAME.match(p.name)]
        return [v for v in vols if v is not None]

    def users(self, name: str) -> builtins.list[str]:
        """IDs of the containers whose bundle mounts this volume."""
        data = str(self.dir / name / "_data")
        found = []
        for cfg in sorted(self.root.containers.glob("*/config.json")):
            try:
                mounts = json.loads(cfg.read_text()).get("mounts", [])
            except (OSError, ValueError):
                continue
            if any(m.get("source") == data for m in mounts):
                found.append(cfg.parent.name)
        return found

    def remove(self, name: str, force: bool = False) -> None:
        vol = self.get(name)
        users = self.users(vol.name)
        if users and not force:
            raise ContainerError(f"remove {name}: volume is in use - [{', '.join(u[:12] for u in users)}]")
        shutil.rmtree(self.dir / vol.name)

    def prune(self, include_named: bool = False) -> builtins.list[tuple[str, int]]:
        """Remove the volumes no container uses: anonymous ones, and named ones too if asked
        (docker's `volume prune [-a]`). Returns (name, bytes freed) of each removed volume."""
        removed: list[tuple[str, int]] = []
        for vol in self.list():
            if (vol.anonymous or include_named) and not self.users(vol.name):
                size = disk_usage(vol.mountpoint)
                shutil.rmtree(self.dir / vol.name)
                removed.append((vol.name, size))
        return removed

    def spec_mounts(self, requests: builtins.list[MountRequest],
                    rootfs: Path) -> tuple[builtins.list[dict], builtins.list[str]]:
        """The runtime spec's mounts for `requests`, and the anonymous volumes created for them.

        Named volumes are created on first use, and an empty one takes the image's content at
        its target from the mounted `rootfs`; -v creates a missing host directory, --mount
        refuses it (docker's rules)."""
        mounts: list[dict] = []
        anonymous: list[str] = []
        try:
            for r in requests:
                mounts.append(self._spec_mount(r, rootfs, anonymous))
        except BaseException:
            for name in anonymous:         # nothing else knows of them yet
                shutil.rmtree(self.dir / name, ignore_errors=True)
            raise
        return mounts, anonymous

    def _spec_mount(self, r: MountRequest, rootfs: Path, anonymous: builtins.list[str]) -> dict:
        """The runtime spec's mount of one request (a new anonymous volume's name goes to `anonymous`)."""
        if r.type == "tmpfs":
            opts = ["nosuid", "nodev", "noexec", *r.tmpfs_options]
            if "exec" in r.tmpfs_options:
                opts.remove("noexec")
            opts.append("ro" if r.readonly else "rw")
            return {"destination": r.target, "type": "tmpfs", "source": "tmpfs", "options": opts}
        if r.type == "volume":
            vol = self.create(r.source or None)
            if not r.source:
                anonymous.append(vol.name)
            if r.copy_image_content:
                _copy_image_content(rootfs, r.target, vol.mountpoint)
            source = str(vol.mountpoint)
        else:
            source = r.source
            if not os.path.exists(source):
                if not r.create_source:
                    raise ConfigError(f"invalid mount config for type \"bind\": bind source path does "
                                      f"not exist: {source}")
                try:
                    os.makedirs(source, exist_ok=True)
                except OSError as e:
                    raise ConfigError(f"cannot create the host directory {source} for -v: "
                                      f"{e.strerror}") from None
        return {"destination": r.target, "type": "bind", "source": source,
                "options": ["rbind", "rprivate", "ro" if r.readonly else "rw"]}


def _copy_image_content(rootfs: Path, target: str, data: Path) -> None:
    """Fill an empty volume with the image's directory at `target` (resolved inside the rootfs)."""
    if any(data.iterdir()):
        return
    src = resolve_in_root(rootfs, target)
    if src is None or not src.is_dir() or src.is_symlink():
        return
    r = subprocess.run(["cp", "-a", "--", f"{src}/.", f"{data}/"], capture_output=True, text=True)
    if r.returncode != 0:
        raise ContainerError(f"cannot copy the image's {target} into its volume: "
                             f"{(r.stderr.strip().splitlines() or ['cp failed'])[-1]}")


def disk_usage(path: Path) -> int:
    """Bytes of the files under `path` (each inode once; symlinks not followed)."""
    total, seen = 0, set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def check_mount_kinds(rootfs: Path, mounts: list[dict]) -> None:
    """A directory cannot be mounted over a file of the image, nor a file over a directory:
    one clear error instead of the runtime's (the target resolved inside the rootfs)."""
    for m in mounts:
        if m["type"] != "bind":
            continue
        target = resolve_in_root(rootfs, m["destination"])
        if target is None or not os.path.lexists(target):
            continue                   # the runtime creates it
        source_is_dir, target_is_dir = os.path.isdir(m["source"]), target.is_dir()
        if source_is_dir and not target_is_dir:
            raise ConfigError(f"cannot mount the directory {m['source']} over {m['destination']}: "
                              "it is not a directory in the image")
        if target_is_dir and not source_is_dir:
            raise ConfigError(f"cannot mount the file {m['source']} over {m['destination']}: "
                              "it is a directory in the image")
