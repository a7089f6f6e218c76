"""`lazyoci exec` into running containers of both snapshotters, and docker's 127/126 for a command
that is missing or cannot run, in `run` and `exec` alike. Real runc, the local registry; every test
leaves no mount, runc container or process behind (the `lz` fixture of test_run checks)."""

from __future__ import annotations

import subprocess
import time
import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import push_soci_index, write_config
from helpers.tricky_image import PASSWD, push_tricky_image, tricky_layers
from test_run import LAZYOCI, env, leftovers, lz  # noqa: F401  (fixtures shared with test_run)

pytestmark = pytest.mark.needs_root("runc and overlay")


def _one_error_line(r: subprocess.CompletedProcess, code: int, text: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0] == f"lazyoci: error: {text}", r.stderr


def test_run_of_a_missing_command_is_127_and_of_a_file_that_cannot_run_126(env, lz):
    lz("pull", "-q", env["tricky"])      # no progress rows on stderr below
    _one_error_line(lz("run", "--rm", env["tricky"], "nosuchcmd", check=False), 127,
                    'exec: "nosuchcmd": executable file not found in $PATH')
    _one_error_line(lz("run", "--rm", env["tricky"], "/no/such/binary", check=False), 127,
                    'exec: "/no/such/binary": stat /no/such/binary: no such file or directory')
    _one_error_line(lz("run", "--rm", env["tricky"], "/etc/passwd", check=False), 126,
                    'exec: "/etc/passwd": permission denied')
    _one_error_line(lz("run", "-d", env["tricky"], "/etc", check=False), 126, 'exec: "/etc": permission denied')
    assert lz("ps", "-a", "-q").stdout == ""       # nothing created is left
    # A command through a symlink of the image (an applet) still runs.
    assert lz("run", "--rm", env["tricky"], "/bin/echo", "ok").stdout == "ok\n"


def test_a_command_only_root_may_execute_is_126_for_another_user(env, lz, registry):
    layers = tricky_layers() + [make_layer([Entry("bin/rootonly", data=b"#!/bin/sh\necho root\n", mode=0o700)])]
    push_image(registry.host, "exec/rootonly", layers, image_config(layers, cmd=["/bin/true"]), env["work"])
    ref = f"{registry.host}/exec/rootonly:latest"
    lz("pull", "-q", ref)
    assert lz("run", "--rm", ref, "rootonly").stdout == "root\n"
    _one_error_line(lz("run", "--rm", "-u", "app", ref, "rootonly", check=False), 126,
                    'exec: "rootonly": permission denied')
    _one_error_line(lz("run", "--rm", "-u", "app", ref, "/bin/rootonly", check=False), 126,
                    'exec: "/bin/rootonly": permission denied')
    cid = lz("run", "-d", ref, "sleep", "60").stdout.strip()
    assert lz("exec", cid, "rootonly").stdout == "root\n"
    _one_error_line(lz("exec", "-u", "app", cid, "rootonly", check=False), 126, 'exec: "rootonly": permission denied')
    lz("rm", "-f", cid)


def test_exec_runs_in_the_container_with_its_exit_code_env_user_and_workdir(env, lz):
    cid = lz("run", "-d", "--name", "target", "-e", "FROMRUN=1", env["tricky"],
             "sh", "-c", "echo inside > /tmp/mark; sleep 60").stdout.strip()
    deadline = time.monotonic() + 20
    while lz("exec", "target", "cat", "/tmp/mark", check=False).stdout != "inside\n":
        assert time.monotonic() < deadline, "the container never wrote its mark"
        time.sleep(0.1)
    assert lz("exec", "target", "sh", "-c", "exit 5", check=False).returncode == 5
    r = lz("exec", "-e", "FROMRUN=2", "-e", "NEW=x", "-u", "app", "-w", "/tmp", "target",
           "sh", "-c", "id -u; pwd; echo $FROMRUN $NEW $HOME; env | grep -c ^FROMRUN=")
    assert r.stdout.splitlines() == ["1000", "/tmp", "2 x /home/app", "1"]
    assert lz("exec", "-i", cid[:12], "wc", "-c", input="12345\n").stdout.split()[0] == "6"
    assert lz("exec", "target", "cat", input="not passed\n").stdout == ""
    # the container's own namespaces: its init is PID 1
    assert lz("exec", "target", "cat", "/proc/1/cmdline").stdout.startswith("sleep\x0060")
    _one_error_line(lz("exec", "target", "nosuchcmd", check=False), 127,
                    'exec: "nosuchcmd": executable file not found in $PATH')
    _one_error_line(lz("exec", "target", "/etc/passwd", check=False), 126, 'exec: "/etc/passwd": permission denied')
    r = lz("exec", "-u", "nosuchuser", "target", "true", check=False)
    assert r.returncode != 0 and "nosuchuser" in r.stderr and "Traceback" not in r.stderr
    assert not list((env["root"] / "containers" / cid).glob("exec-*.json"))   # process files removed
    lz("stop", "-t", "1", "target")
    _one_error_line(lz("exec", "target", "true", check=False), 1, "container target is not running")
    _one_error_line(lz("exec", "nosuchcontainer", "true", check=False), 1, "no such container: nosuchcontainer")
    lz("rm", "target")


def test_exec_into_a_lazy_container_reads_lazily(registry, data_root, tmp_path):
    img = push_tricky_image(registry.host, "exec/lazy", tmp_path)
    push_soci_index(registry.host, "exec/lazy", tmp_path)
    ref = f"{registry.host}/exec/lazy:latest"
    config = write_config(tmp_path / "config.yaml")

    def lzc(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([LAZYOCI, "--root", str(data_root), "--config", str(config), *args],
                           capture_output=True, text=True, timeout=120, **kw)
        assert not check or r.returncode == 0, r.stderr
        return r

    try:
        cid = lzc("run", "-d", "--snapshotter", "soci", ref, "sleep", "60").stdout.strip()
        assert "soci" in lzc("ps").stdout and "not lazy" not in lzc("ps").stdout
        assert lzc("exec", cid, "cat", "/etc/passwd").stdout == PASSWD.decode()
        # served from spans: no layer was downloaded whole
        assert not any((data_root / "blobs/sha256" / l.digest.split(":")[1]).exists() for l in img.layers)
        _one_error_line(lzc("exec", cid, "nosuchcmd", check=False), 127,
                        'exec: "nosuchcmd": executable file not found in $PATH')
        lzc("rm", "-f", cid)
    finally:
        for c in lzc("ps", "-a", "-q", check=False).stdout.split():
            lzc("rm", "-f", c, check=False)
        lzc("service", "stop", check=False)
    deadline = time.monotonic() + 20
    while leftovers(data_root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leftovers(data_root)
