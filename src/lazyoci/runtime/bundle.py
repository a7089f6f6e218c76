"""OCI runtime bundles: config.json from an image config and `run`'s flags.

Docker's rules: `--entrypoint` replaces the image's Entrypoint and clears its Cmd;
arguments after the image replace Cmd; `-e` and `--env-file` override the image's
Env; `-w` overrides WorkingDir; `-u` overrides User, which is resolved through the
image's own /etc/passwd and /etc/group (names, numbers, supplementary groups).
The container shares the host's network namespace (so it sees the host's network
exactly); /etc/hosts, /etc/resolv.conf and /etc/hostname are generated files
bind-mounted read-only. The rest follows runc's default spec, with docker's default
capability set so images behave as they do under docker.

`HostOptions` carries what `run` asks of the host rather than of the process: the
mounts of volumes, a read-only root, capabilities added or dropped, `--privileged`,
cgroup limits (memory, CPUs) and the hostname; labels become the spec's annotations.
"""

from __future__ import annotations

import json
import os
import re
import resource
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazyoci.errors import ConfigError, ContainerError
from lazyoci.oci.manifest import ImageConfig
from lazyoci.store.modes import SHARED_FILE_MODE, write_file

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CAPABILITIES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
                "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
                "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
# Every capability Linux defines, in bit order (capability(7)).
ALL_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
    "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE")
MIN_MEMORY = 6 << 20          # docker's minimum for --memory
CPU_PERIOD = 100_000          # microseconds; --cpus N is a quota of N periods


@dataclass(frozen=True)
class HostOptions:
    """What `run` asks of the host: mounts, root, capabilities, cgroup limits, hostname, labels."""

    mounts: tuple[dict, ...] = ()            # runtime spec mounts of -v/--mount/--tmpfs (runtime/volumes.py)
    read_only: bool = False                  # --read-only
    cap_add: tuple[str, ...] = ()            # --cap-add (names with or without CAP_, or ALL)
    cap_drop: tuple[str, ...] = ()           # --cap-drop
    privileged: bool = False                 # --privileged
    memory: int | None = None                # --memory, bytes
    cpus: float | None = None                # --cpus
    hostname: str | None = None              # --hostname (default: the host's, as with the host network)
    labels: tuple[tuple[str, str], ...] = ()  # --label K=V


def _capability(name: str) -> str:
    cap = name.strip().upper()
    if cap == "ALL":
        return cap
    if not cap.startswith("CAP_"):
        cap = "CAP_" + cap
    if cap not in ALL_CAPABILITIES:
        raise ConfigError(f"unknown capability: {name!r}")
    return cap


def available_capabilities() -> list[str]:
    """The capabilities we hold in our bounding set: a container cannot be given more."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapBnd:"):
                mask = int(line.split()[1], 16)
                return [c for i, c in enumerate(ALL_CAPABILITIES) if mask >> i & 1]
    except (OSError, ValueError):
        pass
    return list(ALL_CAPABILITIES)


def capability_set(host: "HostOptions") -> list[str]:
    """docker's rules: the default set, less --cap-drop (ALL: none), plus --cap-add (ALL: every one)."""
    add = [_capability(c) for c in host.cap_add]
    drop = [_capability(c) for c in host.cap_drop]
    available = available_capabilities()
    if host.privileged or "ALL" in add:
        return available
    caps = [] if "ALL" in drop else [c for c in CAPABILITIES if c not in drop]
    for c in add:
        if c not in caps:
            if c not in available:
                raise ConfigError(f"cannot add capability {c}: lazyoci itself does not hold it")
            caps.append(c)
    return caps


_HOSTNAME = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*\Z")


def check_host_options(host: "HostOptions") -> None:
    """Every flag of `host` checked, as one error before anything is created."""
    capability_set(host)
    check_limits(host.memory, host.cpus)
    if host.hostname is not None and (len(host.hostname) > 64 or not _HOSTNAME.match(host.hostname)):
        raise ConfigError(f"invalid hostname {host.hostname!r}: letters, digits, '-' and '.', at most 64")


def parse_cpus(text: str) -> float:
    """--cpus: a decimal number of CPUs."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or not re.fullmatch(r"\d+(\.\d+)?|\.\d+", text.strip()):
        raise ConfigError(f"invalid --cpus {text!r}: use a number of CPUs such as 1.5")
    return value


_NOT_HOST_DEVICES = {"/dev/pts", "/dev/shm", "/dev/mqueue", "/dev/fd", "/dev/console", "/dev/ptmx"}


def host_devices(top: Path = Path("/dev")) -> list[dict]:
    """The host's device nodes as runtime spec devices, for `--privileged` (the runtime makes
    its own console, ptmx and pts)."""
    devices = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if os.path.join(dirpath, d) not in _NOT_HOST_DEVICES)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if path in _NOT_HOST_DEVICES:
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                devices.append({"path": path, "type": "c" if stat.S_ISCHR(st.st_mode) else "b",
                                "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
                                "fileMode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid})
    return devices


def check_limits(memory: int | None, cpus: float | None) -> None:
    """docker's bounds for --memory and --cpus, as one error before anything is created."""
    if memory is not None and memory < MIN_MEMORY:
        raise ConfigError("minimum memory limit allowed is 6MB")
    if cpus is not None:
        n = os.cpu_count() or 1
        if not 0.01 <= cpus <= n:
            raise ConfigError(f"range of CPUs is from 0.01 to {n}.00, as there are only {n} CPUs available")


@dataclass(frozen=True)
class ProcessOptions:
    """What `run` may override in the image's process settings."""

    args: tuple[str, ...] = ()          # CMD ARG... after the image reference
    entrypoint: str | None = None       # --entrypoint ("" clears the image's)
    env: tuple[str, ...] = ()           # -e K=V / K (taken from our environment), --env-file lines
    workdir: str | None = None          # -w
    user: str | None = None             # -u USER[:GROUP]
    tty: bool = False                   # -t


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    home: str


def parse_env_file(path: Path) -> tuple[str, ...]:
    """docker's --env-file: KEY=VALUE lines, `#` comments, bare KEY takes our environment's value."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"env file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} "
                          f"at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read env file {path}: {e.strerror}") from None
    return tuple(l.strip() for l in lines if l.strip() and not l.lstrip().startswith("#"))


def process_args(config: ImageConfig, opts: ProcessOptions) -> list[str]:
    if opts.entrypoint is not None:
        entry = [opts.entrypoint] if opts.entrypoint else []
        cmd = list(opts.args)
    else:
        entry = list(config.entrypoint)
        cmd = list(opts.args) if opts.args else list(config.cmd)
    argv = entry + cmd
    if not argv:
        raise ContainerError("no command specified: the image has no Entrypoint or Cmd, give one after the image")
    return argv


def merge_env(image_env: tuple[str, ...], overrides: tuple[str, ...]) -> list[str]:
    env: dict[str, str] = {}
    for item in image_env:
        k, _, v = item.partition("=")
        env[k] = v
    for item in overrides:
        k, sep, v = item.partition("=")
        if not k:
            raise ConfigError(f"invalid environment variable {item!r}")
        if sep:
            env[k] = v
        elif k in os.environ:
            env[k] = os.environ[k]
        else:
            env.pop(k, None)
    env.setdefault("PATH", DEFAULT_PATH.split("=", 1)[1])
    return [f"{k}={v}" for k, v in env.items()]


def resolve_in_root(root: Path, rel: str) -> Path | None:
    """The path of `rel` inside root, following symlinks as the container would see them
    (absolute targets start at root, `..` stops at root). None if it cannot be resolved."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    current: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if current:
                current.pop()
            continue
        candidate = root.joinpath(*current, part)
        try:
            st = os.lstat(candidate)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        current.append(part)
    return root.joinpath(*current)


def _read_image_file(rootfs: Path, rel: str) -> list[list[str]]:
    """Colon-separated records of a file of the image (symlinks resolved inside the image)."""
    path = resolve_in_root(rootfs, rel)
    try:
        if path is None or not stat.S_ISREG(os.lstat(path).st_mode):
            return []
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


MAX_ID = 0xFFFFFFFE    # (uid_t)-1 means "no change" to the kernel, so it is not an id


def parse_id(text: str) -> int | None:
    """A uid or gid written in ASCII digits, else None.

    `int()` and `str.isdigit` also accept other scripts' digits ("٣" is 3), which
    no passwd file, runc or docker means as a number."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _entry_id(record: list[str], field: int, file: str, what: str) -> int:
    """The uid/gid field of a passwd/group record the container will use; a clear error if it is not a number."""
    value = parse_id(record[field])
    if value is None:
        raise ContainerError(f"invalid {file} entry {record[0]!r} in the image: "
                             f"its {what} {record[field]!r} is not a number")
    return value


def resolve_user(rootfs: Path, spec: str) -> ResolvedUser:
    """USER[:GROUP] by name or number, as docker resolves it against the image's files."""
    user, _, group = (spec or "0").partition(":")
    passwd = [r for r in _read_image_file(rootfs, "etc/passwd") if len(r) >= 7]
    groups = [r for r in _read_image_file(rootfs, "etc/group") if len(r) >= 4]
    entry = None
    uid = parse_id(user)
    if uid is not None:
        entry = next((r for r in passwd if parse_id(r[2]) == uid), None)
    else:
        entry = next((r for r in passwd if r[0] == user), None)
        if entry is None:
            raise ContainerError(f"unable to find user {user}: no matching entries in passwd file")
        uid = _entry_id(entry, 2, "/etc/passwd", "uid")
    gid = _entry_id(entry, 3, "/etc/passwd", "gid") if entry is not None else 0
    if group:
        group_id = parse_id(group)
        if group_id is None:
            g = next((r for r in groups if r[0] == group), None)
            if g is None:
                raise ContainerError(f"unable to find group {group}: no matching entries in group file")
            group_id = _entry_id(g, 2, "/etc/group", "gid")
        gid = group_id
    name = entry[0] if entry is not None else None
    extra = tuple(sorted({n for r in groups if name and name in r[3].split(",")
                          for n in [parse_id(r[2])] if n is not None and n != gid}))
    home = entry[5] if entry is not None and entry[5] else "/"
    return ResolvedUser(uid, gid, extra, home)


GENERATED_FILES = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")


def _host_name() -> str:
    """The host's name as gethostname(2) gives it on Linux (uname's nodename), without loading
    the socket module on `run`'s way to runc."""
    return os.uname().nodename


def write_etc_files(dest: Path, hostname: str | None = None) -> dict[str, Path]:
    """The generated /etc files of a container (host network: the host's resolver; its name by default).

    They are 0644 whatever our umask: the container's own user, maybe not root, reads them."""
    dest.mkdir(parents=True, exist_ok=True)
    hostname = hostname or _host_name()
    files = {
        "/etc/hostname": hostname + "\n",
        "/etc/hosts": ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                       f"127.0.1.1\t{hostname}\n"),
    }
    try:
        files["/etc/resolv.conf"] = Path("/etc/resolv.conf").read_text()
    except OSError:
        files["/etc/resolv.conf"] = "nameserver 127.0.0.1\n"
    out = {}
    for target, text in files.items():
        p = dest / target.rsplit("/", 1)[1]
        write_file(p, text.encode(), SHARED_FILE_MODE)
        out[target] = p
    return out


def build_spec(config: ImageConfig, rootfs: Path, etc_dir: Path, opts: ProcessOptions,
               host: HostOptions = HostOptions()) -> dict:
    """The runtime spec (config.json) for a container whose rootfs is mounted at `rootfs`."""
    user = resolve_user(rootfs, opts.user if opts.user is not None else config.user)
    env = merge_env(config.env, opts.env)
    if not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={user.home}")
    if opts.tty and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    cwd = opts.workdir or config.working_dir or "/"
    if not cwd.startswith("/"):
        raise ConfigError(f"the working directory must be absolute, not {cwd!r}")
    check_host_options(host)
    caps = capability_set(host)
    hostname = host.hostname or _host_name()
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "rw" if host.privileged else "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "rw" if host.privileged else "ro"]},
    ]
    for target, src in write_etc_files(etc_dir, hostname).items():
        mounts.append({"destination": target, "type": "bind", "source": str(src),
                       "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]})
    mounts += [dict(m) for m in host.mounts]
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": opts.tty,
            "user": {"uid": user.uid, "gid": user.gid, "additionalGids": list(user.additional_gids)},
            "args": process_args(config, opts),
            "env": env,
            "cwd": cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [_nofile()],
            "noNewPrivileges": False,
        },
        "root": {"path": str(rootfs), "readonly": host.read_only},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            # No network namespace: the host's network, as `--network host`.
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                            "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
    if host.labels:
        spec["annotations"] = dict(host.labels)
    linux = spec["linux"]
    if host.privileged:
        # Every capability, the whole of /proc and /sys, the host's devices.
        linux["maskedPaths"], linux["readonlyPaths"] = [], []
        linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
        linux["devices"] = host_devices()
    if host.memory is not None:
        linux["resources"]["memory"] = {"limit": host.memory}
    if host.cpus is not None:
        linux["resources"]["cpu"] = {"quota": round(host.cpus * CPU_PERIOD), "period": CPU_PERIOD}
    return spec


def _nofile() -> dict:
    """The open-files limit: ours (a container cannot be given more than we have)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else 1048576
    return {"type": "RLIMIT_NOFILE", "hard": limit, "soft": limit}


def write_bundle(bundle: Path, spec: dict) -> None:
    """config.json, 0600: it holds the container's environment (`-e PASSWORD=...`)."""
    write_file(bundle / "config.json", json.dumps(spec, indent=1).encode())
