"""`run`'s host flags with real runc: -v/--mount/--tmpfs, named and anonymous volumes and `volume
create/ls/inspect/rm`, --read-only, capabilities, --privileged, --hostname, --label, --memory/--cpus,
--restart on-failure; and their bad input, each one line with nothing created. The `lz` fixture of
test_run checks that no mount, runc container or process is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.tricky_image import PASSWD, tricky_layers
from test_run import LAZYOCI, env, lz  # noqa: F401  (fixtures shared with test_run)

pytestmark = pytest.mark.needs_root("runc and overlay")


def _one_error_line(r: subprocess.CompletedProcess, text: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("lazyoci: error:") and text in lines[0], r.stderr


def _wait_exited(lz, name: str) -> str:
    deadline = time.monotonic() + 60
    while True:
        row = next(l for l in lz("ps", "-a").stdout.splitlines() if l.endswith(name))
        if "Exited" in row:
            return row
        assert time.monotonic() < deadline, row
        time.sleep(0.1)


def _volumes(root: Path) -> list[str]:
    d = root / "volumes"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_bind_mounts_read_write_and_read_only(env, lz, tmp_path):
    lz("pull", "-q", env["tricky"])
    host = tmp_path / "host"
    host.mkdir()
    (host / "in.txt").write_text("from host\n")
    r = lz("run", "--rm", "-v", f"{host}:/data", env["tricky"], "sh", "-c", "cat /data/in.txt; echo out > /data/out.txt")
    assert r.stdout == "from host\n" and (host / "out.txt").read_text() == "out\n"
    r = lz("run", "--rm", "-v", f"{host}:/data:ro", env["tricky"], "sh", "-c", "echo x > /data/ro.txt", check=False)
    assert r.returncode != 0 and not (host / "ro.txt").exists()
    r = lz("run", "--rm", "--mount", f"type=bind,source={host},target=/m,readonly", env["tricky"], "cat", "/m/in.txt")
    assert r.stdout == "from host\n"
    r = subprocess.run([LAZYOCI, "--root", str(env["root"]), "run", "--rm", "-v", "./host:/rel", env["tricky"],
                        "cat", "/rel/in.txt"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.stdout == "from host\n", r.stderr                        # relative to the current directory
    r = lz("run", "--rm", "-v", f"{host}/in.txt:/etc/motd:ro", env["tricky"], "cat", "/etc/motd")
    assert r.stdout == "from host\n"                                 # a single file, over the image's
    _one_error_line(lz("run", "--rm", "-v", f"{host}:/etc/motd", env["tricky"], "true", check=False),
                    f"cannot mount the directory {host} over /etc/motd: it is not a directory in the image")
    _one_error_line(lz("run", "-d", "-v", f"{host}/in.txt:/etc", env["tricky"], "true", check=False),
                    f"cannot mount the file {host}/in.txt over /etc: it is a directory in the image")
    assert lz("ps", "-a", "-q").stdout == ""
    # -v creates a missing host directory (docker's rule); --mount refuses it.
    lz("run", "--rm", "-v", f"{tmp_path}/made:/made", env["tricky"], "touch", "/made/f")
    assert (tmp_path / "made" / "f").exists()
    _one_error_line(lz("run", "--rm", "--mount", f"type=bind,src={tmp_path}/absent,dst=/x", env["tricky"], "true",
                       check=False), "bind source path does not exist")
    assert not (tmp_path / "absent").exists()


def test_named_volumes_and_the_volume_commands(env, lz):
    root = env["root"]
    assert lz("volume", "create", "--label", "team=a", "vol1").stdout == "vol1\n"
    assert lz("volume", "create", "vol1").stdout == "vol1\n"        # idempotent, as docker
    assert lz("volume", "ls").stdout.splitlines() == ["DRIVER    VOLUME NAME", "local     vol1"]
    info = json.loads(lz("volume", "inspect", "vol1").stdout)
    assert info[0]["Name"] == "vol1" and info[0]["Labels"] == {"team": "a"} and info[0]["Driver"] == "local"
    assert info[0]["Mountpoint"] == str(root / "volumes" / "vol1" / "_data")
    assert (root / "volumes").stat().st_mode & 0o777 == 0o700
    assert (root / "volumes/vol1").stat().st_mode & 0o777 == 0o700
    assert (root / "volumes/vol1/meta.json").stat().st_mode & 0o777 == 0o600
    lz("run", "--rm", "-v", "vol1:/data", env["tricky"], "sh", "-c", "echo kept > /data/f")
    assert lz("run", "--rm", "--mount", "type=volume,source=vol1,target=/v", env["tricky"], "cat", "/v/f").stdout \
        == "kept\n"
    lz("run", "--rm", "-v", "auto:/a", env["tricky"], "true")                    # created on first use
    assert lz("volume", "ls", "-q").stdout.split() == ["auto", "vol1"]
    cid = lz("run", "-d", "-v", "vol1:/data", env["tricky"], "true").stdout.strip()
    _wait_exited(lz, lz("ps", "-a").stdout.splitlines()[1].split()[-1])
    _one_error_line(lz("volume", "rm", "vol1", check=False), f"remove vol1: volume is in use - [{cid[:12]}]")
    lz("rm", cid)
    assert lz("volume", "rm", "vol1", "auto").stdout.split() == ["vol1", "auto"]
    assert _volumes(root) == []
    _one_error_line(lz("volume", "rm", "vol1", check=False), "no such volume: vol1")
    _one_error_line(lz("volume", "inspect", "../etc", check=False), "no such volume: ../etc")
    # an empty volume takes the image's content at its target (docker's copy), unless nocopy
    lz("run", "--rm", "-v", "seeded:/etc", env["tricky"], "true")
    assert (root / "volumes/seeded/_data/passwd").read_bytes() == PASSWD
    lz("run", "--rm", "-v", "bare:/etc:nocopy", env["tricky"], "true")
    lz("run", "--rm", "--mount", "type=volume,src=bare2,dst=/etc,volume-nocopy", env["tricky"], "true")
    assert not any((root / "volumes/bare/_data").iterdir()) and not any((root / "volumes/bare2/_data").iterdir())
    lz("volume", "rm", "seeded", "bare", "bare2")
    # an anonymous volume lives as long as its --rm container
    lz("run", "--rm", "-v", "/anon", env["tricky"], "touch", "/anon/x")
    assert lz("volume", "ls", "-q").stdout == ""
    # rm without -v leaves it; `volume prune` removes unused anonymous ones (-a: named ones too)
    cid = lz("run", "-d", "-v", "/anon", "-v", "named:/n", env["tricky"], "sh", "-c", "echo data > /anon/x").stdout.strip()
    anon = next(v for v in lz("volume", "ls", "-q").stdout.split() if v != "named")
    _wait_exited(lz, lz("ps", "-a").stdout.splitlines()[1].split()[-1])
    assert lz("volume", "prune", "-f").stdout == "Total reclaimed space: 0B\n"      # still used
    lz("rm", cid)
    out = lz("volume", "prune", "-f").stdout.splitlines()
    assert out[:2] == ["Deleted Volumes:", anon] and out[-1].startswith("Total reclaimed space: ")
    assert lz("volume", "ls", "-q").stdout.split() == ["named"]
    assert lz("volume", "prune", "-a", "-f").stdout.splitlines()[:2] == ["Deleted Volumes:", "named"]
    assert lz("volume", "ls", "-q").stdout == ""


def test_read_only_root_with_tmpfs(env, lz, tmp_path):
    r = lz("run", "--rm", "--read-only", env["tricky"], "touch", "/x", check=False)
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    r = lz("run", "--rm", "--read-only", "--tmpfs", "/scratch", "--tmpfs", "/t2:size=1m,mode=700",
           env["tricky"], "sh", "-c", "touch /scratch/x && stat -f -c %T /scratch && stat -c %a /t2")
    assert r.stdout == "tmpfs\n700\n"
    r = lz("run", "--rm", "--mount", "type=tmpfs,target=/t,tmpfs-size=1048576", env["tricky"],
           "sh", "-c", "stat -f -c %T /t")
    assert r.stdout == "tmpfs\n"


def test_capabilities_privileged_hostname_and_labels(env, lz):
    def caps(*flags: str) -> int:
        out = lz("run", "--rm", *flags, env["tricky"], "grep", "CapEff", "/proc/self/status").stdout
        return int(out.split()[1], 16)

    default = caps()
    assert default == 0xa80425fb                     # docker's default set
    assert caps("--cap-drop", "ALL") == 0
    assert caps("--cap-drop", "chown", "--cap-add", "NET_ADMIN") == (default & ~1) | (1 << 12)
    bounding = int(next(l for l in Path("/proc/self/status").read_text().splitlines()
                        if l.startswith("CapBnd")).split()[1], 16)
    assert caps("--privileged") == bounding
    assert caps("--cap-add", "ALL") == bounding
    # --privileged also brings the host's devices (here: the FUSE device, which no default container has)
    probe = "test -c /dev/fuse && echo yes || echo no"
    assert lz("run", "--rm", env["tricky"], "sh", "-c", probe).stdout == "no\n"
    assert lz("run", "--rm", "--privileged", env["tricky"], "sh", "-c", probe).stdout == "yes\n"
    r = lz("run", "--rm", "--hostname", "box1", env["tricky"], "sh", "-c",
           "cat /proc/sys/kernel/hostname /etc/hostname; grep -c box1 /etc/hosts")
    assert r.stdout == "box1\nbox1\n1\n"
    cid = lz("run", "-d", "--label", "a=1", "-l", "b=two", env["tricky"], "true").stdout.strip()
    spec = json.loads((env["root"] / "containers" / cid / "config.json").read_text())
    assert spec["annotations"] == {"a": "1", "b": "two"}
    _wait_exited(lz, lz("ps", "-a").stdout.splitlines()[1].split()[-1])
    lz("rm", cid)


def test_memory_and_cpus_limits_reach_the_cgroup(env, lz):
    cid = lz("run", "-d", "--memory", "64m", "--cpus", "0.5", env["tricky"], "sleep", "60").stdout.strip()
    spec = json.loads((env["root"] / "containers" / cid / "config.json").read_text())
    assert spec["linux"]["resources"]["memory"] == {"limit": 64 << 20}
    assert spec["linux"]["resources"]["cpu"] == {"quota": 50000, "period": 100000}
    pid = int((env["root"] / "containers" / cid / "pid").read_text())
    found = {}
    unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if unified:                                                      # cgroup v2
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            found["memory"] = (base / "memory.max").read_text().strip()
            found["cpu"] = (base / "cpu.max").read_text().split()[0]
            continue
        for name, what, file in (("memory", "memory", "memory.limit_in_bytes"), ("cpu", "cpu", "cpu.cfs_quota_us")):
            if name in controllers.split(","):
                mounted = next(Path("/sys/fs/cgroup", c) for c in (controllers, name)
                               if Path("/sys/fs/cgroup", c).is_dir())
                found[what] = (mounted / path.lstrip("/") / file).read_text().strip()
    assert found == {"memory": str(64 << 20), "cpu": "50000"}
    lz("rm", "-f", cid)


def test_restart_on_failure_under_the_monitor(env, lz, tmp_path):
    host = tmp_path / "runs"
    host.mkdir()
    lz("run", "-d", "--name", "flaky", "--restart", "on-failure:2", "-v", f"{host}:/runs", env["tricky"],
       "sh", "-c", "echo run >> /runs/log; exit 3")
    assert "Exited (3)" in _wait_exited(lz, "flaky")
    assert (host / "log").read_text() == "run\n" * 3                 # the first run and two restarts
    lz("start", "flaky")                                             # start keeps the policy
    deadline = time.monotonic() + 30
    while len((host / "log").read_text().splitlines()) < 6 or "Exited (3)" not in _wait_exited(lz, "flaky"):
        assert time.monotonic() < deadline, (host / "log").read_text()
        time.sleep(0.1)
    lz("rm", "flaky")
    lz("run", "-d", "--name", "ok", "--restart", "on-failure", "-v", f"{host}:/runs", env["tricky"],
       "sh", "-c", "echo ok >> /runs/ok")
    assert "Exited (0)" in _wait_exited(lz, "ok")                   # success: not restarted
    assert (host / "ok").read_text() == "ok\n"
    lz("rm", "ok")
    lz("run", "-d", "--name", "stopped", "--restart", "on-failure", "-v", f"{host}:/runs", env["tricky"],
       "sh", "-c", "echo s >> /runs/s; sleep 60")
    deadline = time.monotonic() + 20
    while not (host / "s").exists():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    lz("stop", "-t", "1", "stopped")                                 # 137, but stopped by the user
    assert "Exited (137)" in _wait_exited(lz, "stopped")
    assert (host / "s").read_text() == "s\n"
    lz("rm", "stopped")
    # a stop while the monitor waits to restart ends the loop too
    lz("run", "-d", "--name", "looping", "--restart", "on-failure", "-v", f"{host}:/runs", env["tricky"],
       "sh", "-c", "echo l >> /runs/l; exit 1")
    deadline = time.monotonic() + 30
    while not (host / "l").exists() or len((host / "l").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lz("stop", "-t", "1", "looping")
    assert "Exited (" in _wait_exited(lz, "looping")
    lz("rm", "looping")


def test_bad_mount_and_host_flags_are_one_line_errors_and_create_nothing(env, lz, tmp_path):
    t = env["tricky"]
    lz("pull", "-q", t)
    before = _volumes(env["root"])
    cases = [
        (["-v", f"{tmp_path}:/a/../etc"], "may not contain '..'"),
        (["-v", f"{tmp_path}:data"], "must be absolute"),
        (["-v", f"{tmp_path}:/"], "cannot mount over the container's root"),
        (["-v", f"{tmp_path}:/d", "--tmpfs", "/d"], "duplicate mount point: /d"),
        (["-v", f"{tmp_path}:/etc/hosts"], "cannot mount over /etc/hosts"),
        (["-v", f"{tmp_path}:/d:rx"], "unknown option 'rx'"),
        (["-v", "bad/name:/d"], "invalid volume name 'bad/name'"),
        (["-v", "x*y:/d"], "invalid volume name 'x*y'"),
        (["--mount", "type=bind,source=/tmp,target=/d,bogus=1"], "unknown key 'bogus'"),
        (["--mount", "type=nfs,target=/d"], "type must be one of"),
        (["--mount", "type=bind,source=rel,target=/d"], "absolute host path"),
        (["--tmpfs", "/d:suid,exec,bogus"], "unknown option 'bogus'"),
        (["--cap-add", "CAP_FLY"], "unknown capability: 'CAP_FLY'"),
        (["--cap-drop", "nothing"], "unknown capability: 'nothing'"),
        (["--memory", "1k"], "minimum memory limit allowed is 6MB"),
        (["--memory", "lots"], "invalid --memory 'lots'"),
        (["--cpus", "1000"], "range of CPUs is from 0.01"),
        (["--cpus", "many"], "invalid --cpus 'many'"),
        (["--cpus", "nan"], "invalid --cpus 'nan'"),
        (["--restart", "always"], "invalid restart policy 'always'"),
        (["--restart", "on-failure"], "add -d"),
        (["-d", "--rm", "--restart", "on-failure:1"], "conflicting options: --restart and --rm"),
        (["--label", "=x"], "invalid --label '=x'"),
        (["--hostname", "bad host"], "invalid hostname 'bad host'"),
    ]
    for flags, text in cases:
        _one_error_line(lz("run", *flags, t, "true", check=False), text)
    assert lz("ps", "-a", "-q").stdout == ""
    assert _volumes(env["root"]) == before
    assert not (tmp_path / "etc").exists() and os.listdir(tmp_path) == []


def test_a_container_path_through_an_image_symlink_stays_in_the_rootfs(env, lz, registry, tmp_path):
    """The image's /escape is a symlink to a host directory's absolute path (and /up to ../../..):
    a volume mounted through either lands inside the container, never in the host's directory."""
    outside = tmp_path / "outside"
    outside.mkdir()
    layers = tricky_layers() + [make_layer([
        Entry("escape", kind="symlink", linkname=str(outside)),
        Entry("up", kind="symlink", linkname="../../../../.." + str(outside))])]
    push_image(registry.host, "run/symlinks", layers, image_config(layers), env["work"])
    ref = f"{registry.host}/run/symlinks:latest"
    lz("pull", "-q", ref)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("volume\n")
    for link in ("escape", "up"):
        r = lz("run", "--rm", "-v", f"{src}:/{link}/sub", ref, "cat", f"/{link}/sub/f")
        assert r.stdout == "volume\n"
        assert os.listdir(outside) == [], f"a mount through /{link} was made on the host"
