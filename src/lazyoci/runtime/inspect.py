"""`container inspect`: a container in docker's JSON shape, for the fields that apply here.

The sources are the container record (state, image, snapshotter), the runtime
bundle's config.json (process, hostname, mounts) and the mount table (the overlay
directories while the rootfs is mounted). Times are RFC 3339 in UTC as docker
writes them; a time that never happened is docker's zero time.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from lazyoci.errors import LazyociError
from lazyoci.runtime.containers import ContainerRecord, ContainerStore

ZERO_TIME = "0001-01-01T00:00:00Z"
# What every container gets from its bundle: not user mounts, so not in "Mounts".
_BUILTIN_DESTINATIONS = {"/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup",
                         "/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}


def rfc3339(ts: float | None) -> str:
    if ts is None:
        return ZERO_TIME
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def inspect_container(store: ContainerStore, name_or_id: str, image_entrypoint: tuple[str, ...] = (),
                      stop_signal: str | None = None) -> dict:
    """docker's `container inspect` object of one container."""
    rec = store.get(name_or_id)
    cdir = store.dir(rec.id)
    spec = _bundle_spec(cdir)
    process = spec.get("process", {})
    args = list(rec.command)
    entry = list(image_entrypoint) if image_entrypoint and args[:len(image_entrypoint)] == list(
        image_entrypoint) else None
    user = process.get("user", {})
    pid = _running_pid(cdir) if rec.status == "running" else 0
    return {
        "Id": rec.id,
        "Created": rfc3339(rec.created),
        "Path": args[0] if args else "",
        "Args": args[1:],
        "State": {
            "Status": rec.status,
            "Running": rec.status == "running",
            "Paused": False,
            "Restarting": False,
            "OOMKilled": False,
            "Dead": False,
            "Pid": pid,
            "ExitCode": rec.exit_code or 0,
            "Error": "",
            "StartedAt": rfc3339(_started_at(cdir)),
            "FinishedAt": rfc3339(rec.finished if rec.status == "exited" else None),
        },
        "Image": rec.image_digest,
        "ResolvConfPath": str(cdir / "etc" / "resolv.conf"),
        "HostnamePath": str(cdir / "etc" / "hostname"),
        "HostsPath": str(cdir / "etc" / "hosts"),
        "LogPath": str(cdir / "container.log"),
        "Name": "/" + rec.name,
        "RestartCount": 0,
        "Driver": rec.snapshotter,
        "Platform": "linux",
        "HostConfig": {"AutoRemove": rec.auto_remove, "Runtime": rec.runtime, "NetworkMode": "host"},
        "GraphDriver": {"Name": rec.snapshotter, "Data": _overlay_dirs(cdir / "rootfs")},
        "Snapshotter": rec.snapshotter,
        "Mounts": _user_mounts(spec),
        "Config": {
            "Hostname": spec.get("hostname", ""),
            "User": f"{user['uid']}:{user['gid']}" if "uid" in user else "",
            "Tty": bool(process.get("terminal", False)),
            "Env": list(process.get("env", [])),
            "Cmd": args[len(entry):] if entry else args,
            "Entrypoint": entry,
            "Image": rec.image,
            "WorkingDir": process.get("cwd", "/"),
            "Labels": _labels(spec),
            "StopSignal": stop_signal or "SIGTERM",
        },
    }


def _bundle_spec(cdir: Path) -> dict:
    try:
        spec = json.loads((cdir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def _running_pid(cdir: Path) -> int:
    try:
        return int((cdir / "pid").read_text().strip())
    except (OSError, ValueError):
        return 0


def _started_at(cdir: Path) -> float | None:
    """The runtime writes the pid file when the container's process starts (again at each `start`)."""
    try:
        return (cdir / "pid").stat().st_mtime
    except OSError:
        return None


def _overlay_dirs(rootfs: Path) -> dict[str, str]:
    """docker's GraphDriver.Data: the overlay's directories while the rootfs is mounted."""
    data = {"MergedDir": str(rootfs)}
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return data
    for line in lines:
        fields = line.split()
        if fields[4] != str(rootfs) or " - overlay " not in line:
            continue
        for option in line.split(" - ", 1)[1].split()[2].split(","):
            key, _, value = option.partition("=")
            name = {"lowerdir": "LowerDir", "upperdir": "UpperDir", "workdir": "WorkDir"}.get(key)
            if name:
                data[name] = value
    return data


def _user_mounts(spec: dict) -> list[dict]:
    """docker's Mounts: the bind and tmpfs mounts the user asked for (not the bundle's own)."""
    out = []
    for m in spec.get("mounts", []):
        if not isinstance(m, dict) or m.get("destination") in _BUILTIN_DESTINATIONS:
            continue
        options = m.get("options", [])
        kind = "bind" if m.get("type") == "bind" or "bind" in options or "rbind" in options else m.get("type", "")
        out.append({"Type": kind, "Source": m.get("source", "") if kind == "bind" else "",
                    "Destination": m.get("destination", ""), "Mode": "ro" if "ro" in options else "",
                    "RW": "ro" not in options, "Propagation": "rprivate" if kind == "bind" else ""})
    return out


def image_facts(images, rec: ContainerRecord) -> tuple[tuple[str, ...], str | None]:
    """The image's Entrypoint and StopSignal, or nothing if the image is gone."""
    try:
        config = images.get(rec.image_digest).config
    except LazyociError:
        return (), None
    return tuple(config.entrypoint), config.stop_signal


def _labels(spec: dict) -> dict[str, str]:
    """`--label`s, kept as the bundle's annotations."""
    labels = spec.get("annotations")
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
