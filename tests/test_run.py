"""`lazyoci run` with real runc containers: exit codes, config and overrides, -d/ps/logs/stop/rm,
two containers at once, a container killed from outside, Ctrl-C. Every test must leave no mount,
no runc container and no process behind (the `clean` fixture checks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.leaks import left_behind
from helpers.tricky_image import PASSWD, push_tricky_image, tricky_layers

pytestmark = pytest.mark.needs_root("runc and overlay mounts")

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def leftovers(root: Path) -> list[str]:
    """Mounts, processes and runc containers that belong to this data root."""
    found = left_behind(root)
    state = root / "runtime" / "runc"
    if state.exists():
        r = subprocess.run(["runc", "--root", str(state), "list", "-q"], capture_output=True, text=True)
        found += [f"runc container {c}" for c in r.stdout.split()]
    return found


@pytest.fixture(scope="module")
def env(registry, tmp_path_factory):
    """One data root for the module (images pulled once); images pushed once."""
    work = tmp_path_factory.mktemp("run")
    root = work / "root"
    push_tricky_image(registry.host, "run/tricky", work)
    layers = tricky_layers()
    cfg = json.loads(image_config(layers, entrypoint=["/bin/echo", "entry"], cmd=["default", "cmd"],
                                  env=["PATH=/bin:/usr/bin", "FOO=from-image", "KEEP=kept"],
                                  workdir="/srv", user="app:extra"))
    push_image(registry.host, "run/configured", layers, json.dumps(cfg).encode(), work)
    yield {"root": root, "tricky": f"{registry.host}/run/tricky:latest",
           "configured": f"{registry.host}/run/configured:latest", "work": work}
    # Never leave anything behind, even after a failed test.
    for c in _ids(root):
        _lz(root, "rm", "-f", c, check=False)


def _lz(root: Path, *args: str, check: bool = True, input: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([LAZYOCI, "--root", str(root), *args], capture_output=True, text=True,
                       input=input, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"lazyoci {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


def _ids(root: Path) -> list[str]:
    if not root.exists():
        return []
    return _lz(root, "ps", "-a", "-q", check=False).stdout.split()


@pytest.fixture
def lz(env):
    root = env["root"]

    def run(*args: str, **kw) -> subprocess.CompletedProcess:
        return _lz(root, *args, **kw)

    yield run
    deadline = time.monotonic() + 10
    while leftovers(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = leftovers(root)
    ids = _ids(root)
    for c in ids:
        _lz(root, "rm", "-f", c, check=False)
    assert not left, f"left behind: {left}"
    assert not ids, f"containers left behind: {ids}"


def test_stdout_is_the_container_output_and_progress_goes_to_stderr(env, lz):
    r = lz("run", "--rm", env["tricky"], "cat", "/etc/passwd")
    assert r.stdout == PASSWD.decode()
    assert "layer-sha256:" in r.stderr          # this first run pulled: progress rows on stderr
    r = lz("run", "--rm", env["tricky"])        # the image's Cmd, no pull this time
    assert r.stdout == "tricky\n" and "layer-sha256" not in r.stderr


def test_exit_codes(env, lz):
    assert lz("run", "--rm", env["tricky"], "sh", "-c", "exit 7", check=False).returncode == 7
    assert lz("run", "--rm", env["tricky"], "false", check=False).returncode == 1
    assert lz("run", "--rm", env["tricky"], "sh", "-c", "exit 255", check=False).returncode == 255
    r = lz("run", "--rm", env["tricky"], "/no/such/binary", check=False)
    assert r.returncode != 0
    assert _ids(env["root"]) == []               # --rm removed them all


def test_config_env_workdir_user_and_entrypoint(env, lz):
    probe = "id; pwd; echo FOO=$FOO KEEP=$KEEP HOME=$HOME"
    r = lz("run", "--rm", env["configured"])
    assert r.stdout == "entry default cmd\n"                       # Entrypoint + Cmd
    r = lz("run", "--rm", env["configured"], "a", "b")
    assert r.stdout == "entry a b\n"                               # args replace Cmd only
    r = lz("run", "--rm", "--entrypoint", "/bin/sh", env["configured"], "-c", probe)
    lines = r.stdout.splitlines()
    assert lines[0] == "uid=1000(app) gid=2000(extra) groups=10(wheel)"
    assert lines[1] == "/srv"
    assert lines[2] == "FOO=from-image KEEP=kept HOME=/home/app"
    envfile = env["work"] / "envfile"
    envfile.write_text("# comment\nFROMFILE=yes\nKEEP=file\n")
    r = lz("run", "--rm", "--entrypoint", "/bin/sh", "-e", "FOO=over", "--env-file", str(envfile),
           "-w", "/tmp", "-u", "0:10", env["configured"], "-c", probe + " FROMFILE=$FROMFILE")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("uid=0(root) gid=10(wheel)")
    assert lines[1] == "/tmp"
    assert lines[2] == "FOO=over KEEP=file HOME=/root FROMFILE=yes"
    r = lz("run", "--rm", "--entrypoint", "/bin/id", "-u", "65534", env["configured"])
    assert r.stdout.startswith("uid=65534(nobody) gid=65534(nogroup)")
    r = lz("run", "--rm", "-u", "nosuchuser", env["configured"], check=False)
    assert r.returncode != 0 and "nosuchuser" in r.stderr
    r = lz("run", "--rm", "--entrypoint", "", env["configured"], check=False)
    assert r.returncode != 0 and "no command" in r.stderr


def test_bad_users_and_a_string_cmd_are_one_line_errors(env, lz, registry):
    """Non-numeric ids in the image's passwd, non-ASCII digits in -u, a string Cmd: one line, nothing runs."""
    layers = tricky_layers() + [make_layer([Entry("etc/passwd", data=PASSWD + b"bad:x:abc:1::/:/bin/sh\n")])]
    push_image(registry.host, "run/badpasswd", layers, image_config(layers, cmd=["/bin/id"]), env["work"])
    bad_passwd = f"{registry.host}/run/badpasswd:latest"
    cfg = json.loads(image_config(layers))
    cfg["config"]["Cmd"] = "echo hello"
    push_image(registry.host, "run/stringcmd", layers, json.dumps(cfg).encode(), env["work"])

    def one_line(r: subprocess.CompletedProcess, words: str) -> None:
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and r.stdout == "", r.stdout
        assert lines[-1].startswith("lazyoci: error:") and words in lines[-1], r.stderr
        assert "Traceback" not in r.stderr

    lz("pull", "-q", bad_passwd)
    one_line(lz("run", "--rm", "-u", "bad", bad_passwd, check=False), "its uid 'abc' is not a number")
    one_line(lz("run", "--rm", "-u", "\u0663", env["configured"], check=False), "unable to find user \u0663")
    one_line(lz("run", "--rm", "-u", "0:\u0663", env["configured"], check=False), "unable to find group")
    one_line(lz("run", "--rm", f"{registry.host}/run/stringcmd:latest", check=False),
             "image config Cmd is not a list of strings")
    assert lz("run", "--rm", "-u", "3", bad_passwd).stdout.startswith("uid=3")


def test_host_network_and_generated_etc_files(env, lz):
    r = lz("run", "--rm", env["tricky"], "sh", "-c", "cat /etc/hosts /etc/resolv.conf; ls /sys/class/net")
    assert "localhost" in r.stdout
    host_ifaces = sorted(os.listdir("/sys/class/net"))
    assert sorted(r.stdout.split("\n")[-2].split()) == host_ifaces or all(i in r.stdout for i in host_ifaces)


def test_stdin_with_i(env, lz):
    r = lz("run", "--rm", "-i", env["tricky"], "sh", "-c", "wc -c; cat /dev/null", input="hello stdin\n")
    assert r.stdout.split()[0] == "12"
    r = lz("run", "--rm", env["tricky"], "cat", input="not passed\n")
    assert r.stdout == ""


def test_detach_ps_logs_stop_rm(env, lz):
    cid = lz("run", "-d", "--name", "web", env["tricky"], "sh", "-c", "echo started; sleep 60").stdout.strip()
    assert len(cid) == 64 and all(c in "0123456789abcdef" for c in cid)
    ps = lz("ps").stdout.splitlines()
    assert ps[0].split() == ["CONTAINER", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "SNAPSHOTTER", "NAMES"]
    row = next(l for l in ps if l.startswith(cid[:12]))
    assert "Up" in row and row.endswith("web") and env["tricky"] in row and "overlayfs" in row
    deadline = time.monotonic() + 10
    while "started" not in lz("logs", "web").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lz("logs", "web").stdout == "started\n"
    r = lz("rm", "web", check=False)
    assert r.returncode != 0 and "running" in r.stderr
    t0 = time.monotonic()
    lz("stop", "-t", "1", "web")        # sh as PID 1 ignores SIGTERM: killed after 1 s
    assert time.monotonic() - t0 < 15
    assert "web" not in lz("ps").stdout
    row = next(l for l in lz("ps", "-a").stdout.splitlines() if l.endswith("web"))
    assert "Exited (137)" in row
    lz("rm", "web")
    assert "web" not in lz("ps", "-a").stdout
    assert not (env["root"] / "containers" / cid).exists()


def test_a_name_in_use_is_one_line_conflict(env, lz):
    cid = lz("run", "-d", "--name", "taken", env["tricky"], "sleep", "60").stdout.strip()
    r = lz("run", "--name", "taken", env["tricky"], "true", check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"lazyoci: error: the container name 'taken' is already in use by container {cid[:12]}: "
                        "remove (or rename) that container to reuse the name\n")
    assert lz("ps", "-a", "-q").stdout.split() == [cid[:12]]
    lz("rm", "-f", "taken")


def test_logs_follow_until_exit(env, lz):
    lz("run", "-d", "--name", "counter", env["tricky"], "sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.3; done")
    r = lz("logs", "-f", "counter", timeout=30)
    assert r.stdout == "1\n2\n3\n"
    row = next(l for l in lz("ps", "-a").stdout.splitlines() if l.endswith("counter"))
    assert "Exited (0)" in row
    lz("rm", "counter")


def test_detached_rm_removes_itself(env, lz):
    """A command that exits at once may be gone before `run -d` sees it start: still an ID and
    exit 0, as docker gives (several times, since it is a race)."""
    for _ in range(8):
        cid = lz("run", "-d", "--rm", env["tricky"], "sh", "-c", "exit 3").stdout.strip()
        deadline = time.monotonic() + 15
        while cid[:12] in lz("ps", "-a", "-q").stdout and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cid[:12] not in lz("ps", "-a", "-q").stdout
        assert not (env["root"] / "containers" / cid).exists()


def test_two_containers_of_one_image_at_once(env, lz):
    a = lz("run", "-d", env["tricky"], "sh", "-c", "echo a > /tmp/who; sleep 60").stdout.strip()
    b = lz("run", "-d", env["tricky"], "sh", "-c", "echo b > /tmp/who; sleep 60").stdout.strip()
    running = lz("ps", "-q").stdout.split()
    assert a[:12] in running and b[:12] in running
    names = [l.split()[-1] for l in lz("ps").stdout.splitlines()[1:]]
    assert len(set(names)) == 2
    time.sleep(0.3)
    # Each has its own writable layer.
    for cid, who in ((a, "a"), (b, "b")):
        upper = list((env["root"] / "snapshots" / "overlayfs").glob("*/fs/tmp/who"))
        assert any(p.read_text() == f"{who}\n" for p in upper)
    lz("rm", "-f", a, b)
    assert lz("ps", "-a", "-q").stdout.strip() == ""


def test_container_killed_from_outside_shows_exited(env, lz):
    cid = lz("run", "-d", "--name", "victim", env["tricky"], "sleep", "60").stdout.strip()
    pid = int((env["root"] / "containers" / cid / "pid").read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while "Exited" not in lz("ps", "-a").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    row = next(l for l in lz("ps", "-a").stdout.splitlines() if l.endswith("victim"))
    assert "Exited (137)" in row
    lz("rm", "victim")


def test_monitor_and_container_gone_as_after_a_reboot(env, lz):
    """Kill the monitor and the container (as a host reboot would): ps must say exited, rm must clean up."""
    cid = lz("run", "-d", "--name", "rebooted", env["tricky"], "sleep", "60").stdout.strip()
    cdir = env["root"] / "containers" / cid
    pid = int((cdir / "pid").read_text())
    # The monitor is the parent of runc, which is the parent of the container's init.
    runc_pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    monitor = int(Path(f"/proc/{runc_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(monitor, signal.SIGKILL)
    os.kill(runc_pid, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while "Exited" not in lz("ps", "-a").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    row = next(l for l in lz("ps", "-a").stdout.splitlines() if l.endswith("rebooted"))
    assert "Exited" in row
    lz("rm", "rebooted")      # also removes the runtime's stale state and the rootfs mount


def test_ctrl_c_stops_a_foreground_container(env, lz):
    proc = subprocess.Popen([LAZYOCI, "--root", str(env["root"]), "run", "--name", "fg", env["tricky"],
                             "sh", "-c", "trap 'echo got TERM; exit 42' TERM; echo ready; sleep 60 & wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 42, err
    assert "got TERM" in out
    lz("rm", "fg")


def test_an_exited_container_keeps_its_layer_but_not_its_mount(env, lz):
    cid = lz("run", "-d", env["tricky"], "sh", "-c", "echo kept > /kept").stdout.strip()
    deadline = time.monotonic() + 15
    while "Exited (0)" not in lz("ps", "-a").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    rootfs = env["root"] / "containers" / cid / "rootfs"
    with open("/proc/self/mountinfo") as f:
        assert str(rootfs) not in f.read()
    assert any(p.read_text() == "kept\n" for p in (env["root"] / "snapshots" / "overlayfs").glob("*/fs/kept"))
    lz("rm", cid)
    assert not list((env["root"] / "snapshots" / "overlayfs").glob("*/fs/kept"))


def test_foreground_output_is_exact_and_also_logged(env, lz):
    busybox = Path("/bin/busybox").read_bytes()
    base = [LAZYOCI, "--root", str(env["root"]), "run"]
    r = subprocess.run(base + ["--name", "fglog", env["tricky"], "sh", "-c", "cat /bin/busybox; echo to-stderr >&2"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0
    assert r.stdout == busybox                                   # byte for byte, nothing else on stdout
    assert r.stderr.endswith(b"to-stderr\n")
    logs = subprocess.run([LAZYOCI, "--root", str(env["root"]), "logs", "fglog"], capture_output=True).stdout
    # Both streams are in the log; how they interleave depends on when each pipe was read.
    assert b"to-stderr\n" in logs and logs.replace(b"to-stderr\n", b"", 1) == busybox
    lz("rm", "fglog")
    # A closed reader ends an endless writer (as a direct pipe would).
    p = subprocess.Popen(f"{LAZYOCI} --root {env['root']} run --rm {env['tricky']} sh -c 'while :; do echo y; done'"
                         " | head -n 3", shell=True, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=60)
    assert out == "y\ny\ny\n"
