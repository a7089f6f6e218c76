"""Local users stay out: a non-root user has no path into a container's root filesystem (and its
setuid binaries), its config (`-e PASSWORD=...`), its log, the database, the span cache or the
lazy mount, for both snapshotters; the FUSE mount admits root alone; a data root an older lazyoci
left open is closed on the next command; an entry someone else planted in a shared root is refused;
no mode depends on the umask; `image mount` (meant to be browsed) is nosuid,nodev.

Real runc, overlayfs and FUSE. The probes run as nobody (setpriv) against data roots placed in a
directory nobody can walk through (pytest's own tmp dirs are 0700 and would hide everything), so
the protection seen must come from lazyoci's own directories; their modes are asserted too."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import push_soci_index, write_config
from helpers.tricky_image import BUSYBOX, CMD, tricky_layers

pytestmark = pytest.mark.needs_root("runc, overlay and FUSE")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
NOBODY = 65534
SECRET = "PASSWORD=hunter2-perms-test"
# busybox keeps a setuid root for the applets its /etc/busybox.conf names: `id` then shows euid=0.
BUSYBOX_CONF = b"[SUID]\nid = ssx root.root\n"

# Run as nobody: try each operation, report "ok" or the errno's name.
_PROBE = r"""
import errno, json, os, subprocess, sys
def attempt(kind, path):
    try:
        if kind == "list":
            os.listdir(path)
        elif kind == "stat":
            os.stat(path)
        elif kind == "read":
            with open(path, "rb") as f:
                f.read(1)
        elif kind == "exec":
            subprocess.run([path, "true"], check=True, capture_output=True)
        elif kind == "stat-in-fd":       # "<fd>/<name>": a name in a directory we were handed open
            fd, name = path.split("/", 1)
            os.stat(name, dir_fd=int(fd), follow_symlinks=False)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps({name: attempt(kind, path) for name, (kind, path) in json.loads(sys.argv[1]).items()}))
"""


def as_nobody(ops: dict[str, tuple[str, Path | str]], pass_fds: tuple[int, ...] = ()) -> dict[str, str]:
    spec = json.dumps({name: [kind, str(path)] for name, (kind, path) in ops.items()})
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "/usr/bin/python3", "-I", "-c", _PROBE, spec],
                       capture_output=True, text=True, timeout=60, cwd="/", pass_fds=pass_fds)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def mount_options(target: Path) -> set[str]:
    """The per-mount options (nosuid, nodev, ...) of the mount at target."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(target):
            return set(fields[5].split(","))
    raise AssertionError(f"nothing is mounted at {target}")


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory) -> str:
    """The tricky image plus a setuid-root busybox (and the busybox.conf that lets it keep root)."""
    work = tmp_path_factory.mktemp("perms")
    layers = tricky_layers() + [make_layer([
        Entry("etc", "dir"), Entry("opt", "dir"), Entry("opt/suid", "dir"),
        Entry("opt/suid/busybox", data=BUSYBOX.read_bytes(), mode=0o4755),
        Entry("etc/busybox.conf", data=BUSYBOX_CONF, mode=0o644)])]
    push_image(registry.host, "perms/suid", layers, image_config(layers, cmd=CMD), work)
    push_soci_index(registry.host, "perms/suid", work)
    return f"{registry.host}/perms/suid:latest"


@pytest.fixture
def base(tmp_path):
    """A directory every user may walk through (unlike tmp_path), removed with all it holds."""
    d = Path(tempfile.mkdtemp(prefix="lazyoci-perms-", dir="/tmp"))
    os.chmod(d, 0o755)
    config = write_config(tmp_path / "config.yaml")
    roots: list[Path] = []

    def lz(root: Path, *args: str, check: bool = True, umask: int | None = None) -> subprocess.CompletedProcess:
        if root not in roots:
            roots.append(root)
        r = subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), *args],
                           capture_output=True, text=True, timeout=180,
                           preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
        if check and r.returncode != 0:
            raise AssertionError(f"lazyoci {' '.join(args)} exited {r.returncode}: {r.stderr}")
        return r

    try:
        yield d, lz
    finally:
        for root in roots:
            for c in lz(root, "ps", "-a", "-q", check=False).stdout.split():
                lz(root, "rm", "-f", c, check=False)
            lz(root, "service", "stop", check=False)
        left = [l.split()[4] for l in Path("/proc/self/mountinfo").read_text().splitlines()
                if l.split()[4].startswith(str(d))]
        for m in reversed(left):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
        assert not left, f"mounts left behind: {left}"


def _run_detached(lz, root: Path, image: str, snapshotter: str) -> Path:
    cid = lz(root, "run", "-d", "--snapshotter", snapshotter, "-e", SECRET, image, "sleep", "120").stdout.strip()
    cdir = root / "containers" / cid
    deadline = time.monotonic() + 30
    while not (cdir / "container.log").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cdir


def _probes(root: Path, cdir: Path) -> dict[str, tuple[str, Path]]:
    ops = {
        "list rootfs": ("list", cdir / "rootfs"),
        "stat rootfs": ("stat", cdir / "rootfs"),
        "stat setuid binary": ("stat", cdir / "rootfs/opt/suid/busybox"),
        "exec setuid binary": ("exec", cdir / "rootfs/opt/suid/busybox"),
        "read config.json": ("read", cdir / "config.json"),
        "read container.log": ("read", cdir / "container.log"),
        "read lazyoci.db": ("read", root / "lazyoci.db"),
        "list containers": ("list", root / "containers"),
        "list snapshots": ("list", root / "snapshots"),
        "list runtime state": ("list", root / "runtime"),
        "list blobs": ("list", root / "blobs/sha256"),
        "list tmp": ("list", root / "tmp"),
        "list span cache": ("list", root / "soci"),
        "list lazy mount": ("list", root / "service/mnt"),
        "list plain lazy mount": ("list", root / "service/mnt-plain"),
        "read service log": ("read", root / "service/lazyoci.log"),
    }
    for layer in (root / "soci").iterdir():     # the lazy layers, by the span cache's names
        ops[f"list layer {layer.name[:12]}"] = ("list", root / "service/mnt" / layer.name)
        ops[f"list plain layer {layer.name[:12]}"] = ("list", root / "service/mnt-plain" / layer.name)
        ops[f"list cache {layer.name[:12]}"] = ("list", layer)
    return ops


@pytest.mark.parametrize("snapshotter", ["overlayfs", "soci"])
@pytest.mark.parametrize("where", ["new-root", "shared-dir"])
def test_a_running_container_is_closed_to_other_users(image, base, snapshotter, where):
    """new-root: lazyoci creates the data root (0710, like docker's). shared-dir: the root is an
    existing directory that also holds something else: it keeps its mode (0755 here, nobody may
    list it) and each of lazyoci's own entries must then be closed on its own."""
    d, lz = base
    root = d / "root"
    if where == "shared-dir":
        root.mkdir(mode=0o755)
        os.chmod(root, 0o755)
        (root / "README").write_text("not lazyoci's\n")
    cdir = _run_detached(lz, root, image, snapshotter)
    # as root inside its container, the container keeps its setuid binary working
    inside = lz(root, "run", "--rm", "--snapshotter", snapshotter, "-u", "1000", image,
                "/opt/suid/busybox", "id").stdout
    assert "uid=1000" in inside and "euid=0(root)" in inside, inside
    assert "nosuid" not in mount_options(cdir / "rootfs")
    if snapshotter == "soci":
        assert lz(root, "service", "status").stdout.count("perms/suid") == 4   # served lazily

    # the path up to the data root is open: what stops nobody below is lazyoci's own
    assert as_nobody({"root": ("stat", root)}) == {"root": "ok"}
    got = as_nobody(_probes(root, cdir))
    assert len(got) > (15 if snapshotter == "soci" else 14)
    assert got == {k: "EACCES" for k in got}, got
    assert mode(root) == (0o710 if where == "new-root" else 0o755)
    for p in ("containers", "snapshots", "runtime", "blobs", "tmp", "soci", "service"):
        assert mode(root / p) == 0o700, p
    assert mode(cdir) == 0o700
    for f in ("config.json", "container.log", "exit.json"):
        if (cdir / f).exists():
            assert mode(cdir / f) == 0o600, f
    for f in ("lazyoci.db", "lazyoci.db-wal", "lazyoci.db-shm"):
        if (root / f).exists():
            assert mode(root / f) == 0o600, f
    assert SECRET in (cdir / "config.json").read_text()


def test_an_open_data_root_of_an_older_lazyoci_is_closed_on_the_next_command(image, base):
    d, lz = base
    root = d / "root"
    cdir = _run_detached(lz, root, image, "overlayfs")
    lz(root, "stop", "-t", "1", cdir.name)
    # what lazyoci made before: its directories 0755, its files 0644 (the umask's modes)
    for p in [root, *(p for p in root.iterdir() if p.is_dir()), root / "blobs/sha256", cdir]:
        os.chmod(p, 0o755)
    for p in [root / "lazyoci.db", cdir / "config.json", cdir / "container.log"]:
        os.chmod(p, 0o644)
    assert as_nobody({"c": ("read", cdir / "config.json")}) == {"c": "ok"}     # the hole

    lz(root, "ps", "-a")
    assert mode(root) == 0o710
    for p in ("containers", "snapshots", "runtime", "blobs", "blobs/sha256", "tmp", "soci", "service"):
        assert mode(root / p) == 0o700, p
    assert mode(root / "lazyoci.db") == 0o600
    got = as_nobody({"config": ("read", cdir / "config.json"), "db": ("read", root / "lazyoci.db"),
                     "containers": ("list", root / "containers")})
    assert got == {k: "EACCES" for k in got}, got


def test_modes_do_not_depend_on_the_umask(image, base):
    """umask 0: secrets are still 0600. umask 077: the /etc files a container's non-root user reads
    (bind-mounted from the container's directory) are still 0644."""
    d, lz = base
    root = d / "root"
    cid = lz(root, "run", "-d", "-e", SECRET, image, "sleep", "120", umask=0).stdout.strip()
    cdir = root / "containers" / cid
    lz(root, "service", "start", umask=0)
    lz(root, "stop", "-t", "1", cid, umask=0)
    assert mode(root) == 0o710 and mode(root / "containers") == 0o700 and mode(cdir) == 0o700
    for f in (cdir / "config.json", cdir / "container.log", cdir / "exit.json", root / "lazyoci.db",
              root / "service/lazyoci.log", root / "service/lazyoci.pid"):
        assert mode(f) == 0o600, f
    r = lz(root, "run", "--rm", "-u", "1000", image, "cat", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf",
           umask=0o077, check=False)
    assert r.returncode == 0 and "localhost" in r.stdout, r.stderr


@pytest.mark.parametrize("snapshotter", ["overlayfs", "soci"])
def test_image_mount_is_nosuid_and_nodev_and_still_browsable(image, base, snapshotter):
    d, lz = base
    root, mnt = d / "root", d / "mnt"
    mnt.mkdir(mode=0o755)
    lz(root, "image", "mount", "--snapshotter", snapshotter, image, str(mnt))
    try:
        assert {"nosuid", "nodev"} <= mount_options(mnt)
        # users browse it with the image's own modes (a lazy one too: the overlay reads FUSE as root)
        got = as_nobody({"passwd": ("read", mnt / "etc/passwd"), "list": ("list", mnt / "usr/bin"),
                         "shadow": ("read", mnt / "etc/shadow"), "no-perms": ("read", mnt / "misc/no-perms")})
        assert got == {"passwd": "ok", "list": "ok", "shadow": "EACCES", "no-perms": "EACCES"}, got
        # the setuid binary gives nobody nothing there (chroot: its busybox.conf is the image's; busybox
        # says it cannot take the group its conf names: it did not run as root)
        r = subprocess.run(["chroot", f"--userspec={NOBODY}:{NOBODY}", str(mnt), "/opt/suid/busybox", "id"],
                           capture_output=True, text=True, timeout=60)
        assert "euid=0" not in r.stdout and "setresgid: Operation not permitted" in r.stderr, (r.stdout, r.stderr)
    finally:
        lz(root, "image", "unmount", str(mnt), check=False)


def test_the_lazy_mount_admits_root_alone(image, base):
    """Not only is its directory closed: a non-root process handed an open directory of the FUSE
    mounts (an fd, no path to walk) still cannot look anything up in it (no allow_other); the
    plain mount of the layers without xattrs no more than the other."""
    d, lz = base
    root = d / "root"
    lz(root, "pull", "--snapshotter", "soci", image)
    # the lazy layers' directories, however they are named, in both mounts
    dirs = [m / layer for m in (root / "service/mnt", root / "service/mnt-plain") for layer in sorted(os.listdir(m))]
    assert any(p.parent.name == "mnt" for p in dirs) and any(p.parent.name == "mnt-plain" for p in dirs)
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in dirs]
    try:
        ops = {f"lookup in {p.parent.name}/{p.name[:12]}": ("stat-in-fd", f"{fd}/{sorted(os.listdir(p))[0]}")
               for p, fd in zip(dirs, fds)}
        got = as_nobody(ops, pass_fds=tuple(fds))
    finally:
        for fd in fds:
            os.close(fd)
    assert got == {k: "EACCES" for k in got}, got


@pytest.mark.parametrize("planted", ["dir-of-another-user", "symlink"])
def test_an_entry_planted_in_a_shared_root_is_refused(base, planted):
    """`--root` in a directory others may write to: an entry someone else made first (a directory
    of theirs, or a symlink to one) would hand them what lazyoci keeps there. One clear line."""
    d, lz = base
    root = d / "root"
    root.mkdir(mode=0o1777)
    os.chmod(root, 0o1777)
    theirs = d / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    if planted == "symlink":
        (root / "containers").symlink_to(theirs)
    else:
        (root / "containers").mkdir()
        os.chown(root / "containers", NOBODY, NOBODY)
    r = lz(root, "images", check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"cannot secure {root / 'containers'}" in r.stderr, r.stderr
    assert os.listdir(theirs) == []
