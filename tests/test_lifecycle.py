"""Commands on existing containers with real runc: inspect, start, restart, kill, wait, top, cp,
and `logs`/`ps` options. Every test leaves no mount, runc container or process behind."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from helpers.lazy import push_soci_index, write_config
from helpers.tricky_image import PASSWD, push_tricky_image
from test_run import LAZYOCI, leftovers

pytestmark = pytest.mark.needs_root("runc, overlay and FUSE")


@pytest.fixture(scope="module")
def env(registry, tmp_path_factory):
    work = tmp_path_factory.mktemp("lifecycle")
    root = work / "root"
    push_tricky_image(registry.host, "lifecycle/tricky", work)
    yield {"root": root, "image": f"{registry.host}/lifecycle/tricky:latest", "work": work}
    for c in _lz(root, "ps", "-a", "-q", check=False).stdout.split():
        _lz(root, "rm", "-f", c, check=False)


def _lz(root: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([LAZYOCI, "--root", str(root), *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"lazyoci {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


@pytest.fixture
def lz(env):
    root = env["root"]

    def run(*args: str, **kw) -> subprocess.CompletedProcess:
        return _lz(root, *args, **kw)

    yield run
    for c in _lz(root, "ps", "-a", "-q", check=False).stdout.split():
        _lz(root, "rm", "-f", c, check=False)
    deadline = time.monotonic() + 10
    while leftovers(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leftovers(root)


def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0
    assert r.stderr.startswith("lazyoci: error: ") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def _until(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _inspect(lz, name: str) -> dict:
    [obj] = json.loads(lz("container", "inspect", name).stdout)
    return obj


def test_kill_wait_start_restart(env, lz):
    lz("run", "-d", "--name", "cycle", env["image"], "sh", "-c", "echo run; sleep 60")
    first_pid = _inspect(lz, "cycle")["State"]["Pid"]
    assert first_pid > 0
    assert lz("kill", "cycle").stdout == "cycle\n"                       # SIGKILL by default
    assert lz("wait", "cycle", timeout=30).stdout == "137\n"
    state = _inspect(lz, "cycle")["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 137 and not state["Running"]
    assert state["FinishedAt"] != "0001-01-01T00:00:00Z"

    assert lz("start", "cycle").stdout == "cycle\n"
    state = _inspect(lz, "cycle")["State"]
    assert state["Running"] and state["Pid"] not in (0, first_pid)
    _until(lambda: lz("logs", "cycle").stdout == "run\nrun\n", "the second run's output")   # the log goes on
    assert lz("start", "cycle").returncode == 0                          # running: nothing to do
    lz("run", "--name", "again", env["image"], "sh", "-c", "echo ran; exit 4", check=False)
    r = lz("start", "-a", "again", check=False)                            # this run's output and code
    assert (r.stdout, r.returncode) == ("ran\n", 4)
    _one_line_error(lz("start", "-a", "again", "cycle", check=False), "one container")
    # A container run with -t (here in a terminal `script` provides) is refused before anything starts.
    subprocess.run(["script", "-qec", f"{LAZYOCI} --root {env['root']} run -t --name tty {env['image']} true",
                    "/dev/null"], capture_output=True, timeout=60, check=True)
    _one_line_error(lz("start", "tty", check=False), "tty", "-t")
    _one_line_error(lz("restart", "tty", check=False), "tty", "-t")
    assert lz("logs", "tty").stdout == ""
    lz("rm", "tty")
    lz("rm", "again")

    before = _inspect(lz, "cycle")["State"]["Pid"]
    lz("restart", "-t", "1", "cycle", timeout=60)
    after = _inspect(lz, "cycle")["State"]
    assert after["Running"] and after["Pid"] != before

    lz("kill", "-s", "sigterm", "cycle")       # sh as PID 1 ignores TERM: still running
    lz("kill", "-s", "9", "cycle")
    assert lz("wait", "cycle", timeout=30).stdout == "137\n"
    lz("rm", "cycle")


def test_lifecycle_errors_are_one_line(env, lz):
    lz("run", "--name", "done", env["image"], "true")
    _one_line_error(lz("kill", "done", check=False), "done", "not running")
    _one_line_error(lz("kill", "-s", "NOPE", "done", check=False), "invalid signal: NOPE")
    _one_line_error(lz("kill", "-s", "99", "done", check=False), "invalid signal: 99")
    _one_line_error(lz("top", "done", check=False), "not running")
    _one_line_error(lz("start", "no-such-container", check=False), "no such container: no-such-container")
    _one_line_error(lz("wait", "no-such-container", check=False), "no-such-container")
    _one_line_error(lz("inspect", "no-such-thing", check=False), "no such object: no-such-thing")
    lz("run", "-d", "--rm", "--name", "ephemeral", env["image"], "sleep", "60")
    _one_line_error(lz("restart", "ephemeral", check=False), "ephemeral", "--rm")
    assert _inspect(lz, "ephemeral")["State"]["Running"]    # refused before anything was stopped
    assert lz("wait", "done").stdout == "0\n"                # already exited: at once
    r = lz("wait", "done", "no-such-container", check=False)  # as docker: the others go on, exit 1
    assert r.stdout == "0\n" and r.returncode == 1 and r.stderr.count("\n") == 1 and "no-such-container" in r.stderr
    lz("rm", "done")


def test_inspect_shape(env, lz):
    cid = lz("run", "-d", "--name", "insp", env["image"], "sleep", "60").stdout.strip()
    obj = _inspect(lz, "insp")
    assert obj["Id"] == cid and obj["Name"] == "/insp"
    assert obj["Path"] == "sleep" and obj["Args"] == ["60"]
    assert obj["Config"]["Cmd"] == ["sleep", "60"] and obj["Config"]["Image"] == env["image"]
    assert obj["Config"]["WorkingDir"] == "/" and any(e.startswith("PATH=") for e in obj["Config"]["Env"])
    assert obj["State"]["Status"] == "running" and obj["State"]["Running"] is True
    assert obj["State"]["StartedAt"].endswith("Z") and obj["Created"].endswith("Z")
    assert Path(obj["LogPath"]).is_file()
    assert obj["GraphDriver"]["Name"] == "overlayfs" == obj["Snapshotter"]
    data = obj["GraphDriver"]["Data"]
    assert Path(data["UpperDir"]).is_dir() and data["MergedDir"].endswith("/rootfs") and data["LowerDir"]
    assert obj["Mounts"] == []
    assert obj["Image"].startswith("sha256:")
    r = lz("inspect", "-f", "{{.State.Status}} {{.State.Running}} {{.Name}} {{json .Config.Cmd}}", "insp")
    assert r.stdout == 'running true /insp ["sleep", "60"]\n'
    _one_line_error(lz("inspect", "-f", "{{.State.Nope}}", "insp", check=False), "State.Nope")
    # `inspect` finds containers first, then images.
    [same] = json.loads(lz("inspect", "insp").stdout)
    assert same["Id"] == cid
    [image] = json.loads(lz("inspect", env["image"]).stdout)
    assert image != same and "Id" not in image or image["Id"] != cid
    lz("rm", "-f", "insp")


def test_top_lists_the_container_processes(env, lz):
    cid = lz("run", "-d", "--name", "topped", env["image"], "sh", "-c", "sleep 61 & sleep 62").stdout.strip()
    pid = (env["root"] / "containers" / cid / "pid").read_text().strip()
    _until(lambda: "sleep 62" in lz("top", "topped").stdout, "both sleeps")
    lines = lz("top", "topped").stdout.splitlines()
    assert lines[0].split()[:3] == ["UID", "PID", "PPID"]
    assert any(l.split()[1] == pid for l in lines[1:])
    assert sum("sleep 6" in l for l in lines) == 2
    assert not any("lazyoci" in l for l in lines[1:])        # only the container's processes
    custom = lz("top", "topped", "-o", "pid,comm").stdout.splitlines()
    assert custom[0].split() == ["PID", "COMMAND"] and len(custom) == len(lines)
    lz("rm", "-f", "topped")


def test_cp_in_and_out(env, lz, tmp_path):
    lz("run", "-d", "--name", "cpy", env["image"], "sleep", "60")
    out = tmp_path / "passwd"
    lz("cp", "cpy:/etc/passwd", str(out))
    assert out.read_bytes() == PASSWD
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f.txt").write_text("hello\n")
    (tmp_path / "tree" / "link").symlink_to("sub/f.txt")
    lz("cp", str(tmp_path / "tree"), "cpy:/tmp")
    lz("cp", "cpy:/tmp/tree", str(tmp_path / "back"))
    assert (tmp_path / "back" / "sub" / "f.txt").read_text() == "hello\n"
    assert (tmp_path / "back" / "link").is_symlink() and str((tmp_path / "back" / "link").readlink()) == "sub/f.txt"
    upper = next((env["root"] / "snapshots" / "overlayfs").glob("*/fs/tmp/tree/sub/f.txt"))
    assert upper.stat().st_uid == 0 and upper.read_text() == "hello\n"
    lz("cp", str(tmp_path / "passwd"), "cpy:/renamed")                        # to a new name
    assert next((env["root"] / "snapshots" / "overlayfs").glob("*/fs/renamed")).read_bytes() == PASSWD
    _one_line_error(lz("cp", "cpy:/no/such", str(tmp_path / "x"), check=False), "/no/such")
    _one_line_error(lz("cp", str(tmp_path / "passwd"), "cpy:/no/dir/x", check=False), "/no/dir")
    _one_line_error(lz("cp", "a", "b", check=False), "CONTAINER:PATH")
    _one_line_error(lz("cp", "cpy:/etc/passwd", str(tmp_path / "no" / "dir"), check=False),
                    f"no such directory on the host: {tmp_path / 'no'}")
    _one_line_error(lz("cp", "nope:/x", str(tmp_path), check=False), "no such container: nope")
    lz("stop", "-t", "0", "cpy")
    # A stopped container: its rootfs is mounted for the copy, and unmounted after.
    lz("cp", "cpy:/renamed", str(tmp_path / "again"))
    assert (tmp_path / "again").read_bytes() == PASSWD
    lz("rm", "cpy")


def test_cp_stays_inside_the_rootfs(env, lz, tmp_path):
    """Symlinks made by the container that point outside it resolve inside its rootfs."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    up = "../" * 30
    lz("run", "-d", "--name", "sly", env["image"], "sh", "-c",
       f"mkdir -p {outside} && echo container > {outside}/secret && "
       f"ln -s {up}{outside} /esc && ln -s {outside}/secret /abs && ln -s {up}{outside}/new /dangling; sleep 60")
    _until(lambda: lz("cp", "sly:/esc/secret", str(tmp_path / "got"), check=False).returncode == 0, "the links")
    assert (tmp_path / "got").read_text() == "container\n"             # the container's file, not the host's
    lz("cp", "sly:/abs", str(tmp_path / "abs"))
    assert (tmp_path / "abs").is_symlink()                             # a symlink is copied as a symlink
    (tmp_path / "payload").write_text("payload\n")
    lz("cp", str(tmp_path / "payload"), "sly:/esc/")
    lz("cp", str(tmp_path / "payload"), "sly:/esc/secret")
    lz("cp", str(tmp_path / "payload"), "sly:/dangling")               # replaces the link, not its target
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "host secret\n"
    upper = next((env["root"] / "snapshots" / "overlayfs").glob(f"*/fs{outside}"))
    assert (upper / "payload").read_text() == "payload\n" and (upper / "secret").read_text() == "payload\n"
    assert not (upper / "new").exists()
    lz("rm", "-f", "sly")


def test_ps_format_and_filter(env, lz):
    up = lz("run", "-d", "--name", "up-one", env["image"], "sleep", "60").stdout.strip()
    lz("run", "--name", "gone-3", env["image"], "sh", "-c", "exit 3", check=False)
    lz("run", "--name", "gone-0", "--label", "tier=web", "--label", "canary", env["image"], "true")
    rows = [json.loads(l) for l in lz("ps", "-a", "--format", "{{json .}}").stdout.splitlines()]
    assert [r["Names"] for r in rows] == ["gone-0", "gone-3", "up-one"]          # newest first
    first = rows[2]
    assert first["ID"] == up[:12] and first["Image"] == env["image"] and first["State"] == "running"
    assert first["Status"].startswith("Up") and first["Command"] == '"sleep 60"' and first["Snapshotter"] == "overlayfs"
    assert {"CreatedAt", "RunningFor", "Ports", "Labels", "Mounts", "Networks", "Size"} <= set(first)
    assert lz("ps", "--format", "{{.Names}} {{.State}}").stdout == "up-one running\n"
    table = lz("ps", "-a", "--format", "table {{.Names}}\\t{{.Status}}").stdout.splitlines()
    assert table[0].split() == ["NAMES", "STATUS"] and len(table) == 4
    assert table[1].index("Exited") == table[0].index("STATUS")                   # aligned columns

    def names(*args: str) -> list[str]:
        return lz("ps", *args, "--format", "{{.Names}}").stdout.split()

    assert names("--filter", "status=exited") == ["gone-0", "gone-3"]            # a status filter implies -a
    assert names("-a", "--filter", "exited=3") == ["gone-3"]
    assert names("-a", "--filter", "name=gone", "--filter", "exited=0") == ["gone-0"]
    assert names("-a", "-f", "name=^up", "-f", "name=-3$") == ["gone-3", "up-one"]   # one key: either
    assert names("-a", "-f", f"id={up[:5]}") == ["up-one"]
    assert names("-a", "-f", f"ancestor={env['image']}") == ["gone-0", "gone-3", "up-one"]
    assert names("-a", "-f", "ancestor=other/image") == []
    assert names("-a", "-f", "since=up-one") == ["gone-0", "gone-3"]
    assert names("-a", "-f", "before=gone-3") == ["up-one"]
    assert names("-a", "-f", "label=tier=web") == ["gone-0"]
    assert names("-a", "-f", "label=tier") == ["gone-0"] and names("-a", "-f", "label=tier=db") == []
    assert names("-a", "-f", "label=tier=web", "-f", "label=nope") == []          # labels: all must hold
    assert json.loads(lz("inspect", "gone-0").stdout)[0]["Config"]["Labels"] == {"tier": "web", "canary": ""}
    assert lz("ps", "-a", "-q", "-f", "status=running").stdout.split() == [up[:12]]
    _one_line_error(lz("ps", "-f", "colour=red", check=False), "invalid filter 'colour'")
    _one_line_error(lz("ps", "-f", "status=sleepy", check=False), "status=sleepy")
    _one_line_error(lz("ps", "-f", "name", check=False), "name=value")
    _one_line_error(lz("ps", "--format", "{{.Nope}}", check=False), "'Nope'")
    _one_line_error(lz("ps", "--format", "{{if .Names}}x{{end}}", check=False), "unsupported")


def test_logs_tail_timestamps_since(env, lz):
    lz("run", "-d", "--name", "talker", env["image"], "sh", "-c",
       "echo one; echo two; printf 'three\\nfour'; sleep 2; echo five")
    assert lz("wait", "talker", timeout=30).stdout == "0\n"
    assert lz("logs", "talker").stdout == "one\ntwo\nthree\nfourfive\n"
    assert lz("logs", "--tail", "2", "talker").stdout == "three\nfourfive\n"
    assert lz("logs", "-n", "0", "talker").stdout == ""
    stamped = lz("logs", "--timestamps", "talker").stdout.splitlines()
    assert [l.split(" ", 1)[1] for l in stamped] == ["one", "two", "three", "fourfive"]
    times = [l.split(" ", 1)[0] for l in stamped]
    assert all(len(t) == 30 and t.endswith("Z") and t[10] == "T" for t in times)
    assert times == sorted(times)
    # --since the second before "five" was written (its line started with "four", 2 s earlier).
    import datetime as dt
    last = dt.datetime.fromisoformat(times[-1][:26] + "+00:00")
    since = (last + dt.timedelta(seconds=1)).isoformat()
    assert lz("logs", "--since", since, "talker").stdout == ""
    assert lz("logs", "--since", times[0][:19] + "Z", "talker").stdout == "one\ntwo\nthree\nfourfive\n"
    assert lz("logs", "--since", "10m", "-t", "--tail", "1", "talker").stdout.endswith(" fourfive\n")
    assert lz("logs", "--since", str(int(last.timestamp()) + 5), "talker").stdout == ""
    _one_line_error(lz("logs", "--tail", "x", "talker", check=False), "--tail")
    _one_line_error(lz("logs", "--since", "yesterday", "talker", check=False), "--since")
    lz("rm", "talker")


def test_a_lazy_container_copies_stops_and_starts_again_after_the_service_stopped(registry, data_root, tmp_path):
    """cp reads a soci container's files through its lazy layers; once stopped, the service may stop,
    and `start` serves the layers again (the service started on demand) before the container runs."""
    push_tricky_image(registry.host, "lifecycle/lazy", tmp_path)
    push_soci_index(registry.host, "lifecycle/lazy", tmp_path)
    ref = f"{registry.host}/lifecycle/lazy:latest"
    config = write_config(tmp_path / "config.yaml", extra="snapshotters:\n  - soci\n")

    def lz(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _lz(data_root, "--config", str(config), *args, check=check)

    try:
        lz("run", "-d", "--name", "lazy", ref, "sh", "-c", "echo up; sleep 60")
        assert _inspect(lz, "lazy")["GraphDriver"]["Name"] == "soci"
        lz("cp", "lazy:/bin/busybox", str(tmp_path / "busybox"))
        assert (tmp_path / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
        lz("stop", "-t", "0", "lazy")
        lz("cp", "lazy:/etc/passwd", str(tmp_path / "passwd"))            # stopped: mounted for the copy
        assert (tmp_path / "passwd").read_bytes() == PASSWD
        assert "stopped" in lz("service", "stop").stdout                   # nothing uses the layers now
        lz("start", "lazy")
        assert "running" in lz("service", "status").stdout
        assert _inspect(lz, "lazy")["State"]["Running"]
        _until(lambda: lz("logs", "lazy").stdout == "up\nup\n", "the second start's output")
        lz("rm", "-f", "lazy")
    finally:
        for c in lz("ps", "-a", "-q", check=False).stdout.split():
            lz("rm", "-f", c, check=False)
        lz("service", "stop", check=False)
    _until(lambda: not leftovers(data_root), f"nothing left behind: {leftovers(data_root)}")


def test_since_and_tail_values_as_docker_reads_them():
    from lazyoci.errors import ConfigError
    from lazyoci.runtime.logfile import parse_since, parse_tail

    now = 1_700_000_000 * 10**9
    assert parse_since("10m", now) == now - 600 * 10**9
    assert parse_since("1h30m", now) == now - 5400 * 10**9
    assert parse_since("1.5s", now) == now - 1_500_000_000
    assert parse_since("1700000000.25", now) == 1_700_000_000 * 10**9 + 250_000_000
    assert parse_since("2023-11-14T22:13:20Z", now) == 1_700_000_000 * 10**9
    assert parse_since("2023-11-14T23:13:20+01:00", now) == 1_700_000_000 * 10**9
    assert parse_tail("all") is None and parse_tail("5") == 5
    for bad in ("10 minutes", "", "-5m", "2023-13-01"):
        with pytest.raises(ConfigError):
            parse_since(bad, now)
    for bad in ("-1", "five", "1.5"):
        with pytest.raises(ConfigError):
            parse_tail(bad)


def test_logs_longer_than_one_read(env, lz):
    """Half a MiB of lines is read a stretch at a time: nothing lost or doubled at the seams."""
    lz("run", "-d", "--name", "chatty", env["image"], "sh", "-c",
       "i=0; while [ $i -lt 50000 ]; do echo line$i; i=$((i+1)); done; printf end")
    assert lz("wait", "chatty", timeout=60).stdout == "0\n"
    expected = "".join(f"line{i}\n" for i in range(50000)) + "end"
    assert lz("logs", "chatty").stdout == expected
    assert lz("logs", "--tail", "3", "chatty").stdout == "line49998\nline49999\nend"
    stamped = lz("logs", "-t", "chatty").stdout.split("\n")
    assert len(stamped) == 50001 and all(l.split(" ", 1)[1] == f"line{i}" for i, l in enumerate(stamped[:-1]))
    assert stamped[-1].endswith(" end")
    lz("rm", "chatty")
