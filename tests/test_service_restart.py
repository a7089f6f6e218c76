"""Restarting the service under running lazy containers (service/session_holder.py).

A lazy container checksums every file of a layer while the test restarts the service and
kills it with SIGKILL (then starts it, or lets the session holder start it), the registry behind a proxy that delays every Range request so that
reads are in flight at each restart: the container sees pauses, never an error or a wrong
byte. A config change takes effect across `service restart`; `service stop` names the
containers it would break; when the holder itself dies, readers get an error at once (not a
hang), `service status` says so, and the next `run` works.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.fault_proxy import Fault, FaultProxy
from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import push_soci_index, write_config
from helpers.tricky_image import layer1_entries

pytestmark = pytest.mark.needs_root("FUSE, overlay and runc")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
# 16 MiB of incompressible data in 64 files: with 64 KiB spans and a delay on every Range
# request, a pass over the layer takes long enough for every restart to land inside it.
FILES = {f"data/f{i:02d}.bin": os.urandom(256 << 10) for i in range(64)}
SCRIPT = ("for pass in 1 2; do for f in /data/*; do sha256sum $f || exit 3; done; done; echo finished")


def _lz(root: Path, config: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([LAZYOCI, "--root", str(root), "--config", str(config), *args],
                       capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"lazyoci {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    """busybox (sh, sha256sum) and a layer of FILES, with a SOCI index of 64 KiB spans."""
    work = tmp_path_factory.mktemp("restart")
    base = make_layer(layer1_entries())
    data = make_layer([Entry("data/", kind="dir")] + [Entry(n, data=d) for n, d in FILES.items()])
    push_image(registry.host, "restart/reader", [base, data], image_config([base, data]), work)
    push_soci_index(registry.host, "restart/reader", work)
    return base, data


def _expected_sums() -> str:
    one = "".join(f"{hashlib.sha256(d).hexdigest()}  /{n}\n" for n, d in sorted(FILES.items()))
    return one * 2 + "finished\n"


def _service_pid(root: Path) -> int:
    return int((root / "service" / "lazyoci.pid").read_text())


def _service_pid_or_none(root: Path) -> int | None:
    try:
        return _service_pid(root)
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)


def _cleanup(root: Path, config: Path) -> None:
    for c in _lz(root, config, "ps", "-a", "-q", check=False).stdout.split():
        _lz(root, config, "rm", "-f", c, check=False)
    _lz(root, config, "service", "stop", "--force", check=False)
    left = [m for m in (root / "service" / "mnt", root / "service" / "mnt-plain")
            if f" {m} " in Path("/proc/self/mountinfo").read_text()]
    for m in left:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)
    assert not left, f"FUSE mounts were left behind: {left}"


@pytest.mark.slow
def test_a_reading_container_survives_restarts_and_kill_9_of_the_service(registry, image, data_root, tmp_path):
    config = write_config(tmp_path / "config.yaml")
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("delay", match=f"/blobs/{image[1].digest}", method="GET", seconds=0.25, times=None))
        ref = f"{proxy.host}/restart/reader:latest"
        try:
            cid = _lz(data_root, config, "run", "-d", "--snapshotter", "soci", ref,
                      "sh", "-c", SCRIPT).stdout.strip()
            # the data layer (no xattrs) is stacked from the plain mount, busybox's (with xattrs)
            # from the other: the reads in flight across the restarts below come through the plain one
            rootfs = next(l for l in Path("/proc/self/mountinfo").read_text().splitlines()
                          if f"/containers/{cid}/rootfs " in l)
            assert "/service/mnt-plain/" in rootfs and "/service/mnt/" in rootfs, rootfs
            for action in ("restart", "restart", "kill", "restart", "restart", "crash", "restart"):
                time.sleep(1.0)
                assert _lz(data_root, config, "inspect", "-f", "{{.State.Status}}", cid).stdout.strip() \
                    == "running", "the container finished before the restarts did"
                if action == "restart":
                    assert "running" in _lz(data_root, config, "service", "restart").stdout
                elif action == "kill":            # kill -9, then `service start`
                    pid = _service_pid(data_root)
                    os.kill(pid, signal.SIGKILL)
                    _wait_gone(pid)
                    assert "running" in _lz(data_root, config, "service", "start").stdout
                else:                             # kill -9 alone: the holder starts the service again
                    pid = _service_pid(data_root)
                    os.kill(pid, signal.SIGKILL)
                    deadline = time.monotonic() + 60
                    while _service_pid_or_none(data_root) in (None, pid):
                        assert time.monotonic() < deadline, "the service was not started again"
                        time.sleep(0.05)
            assert _lz(data_root, config, "wait", cid, timeout=300).stdout.strip() == "0", \
                _lz(data_root, config, "logs", cid).stdout
            logs = _lz(data_root, config, "logs", cid)
            assert logs.stdout == _expected_sums(), logs.stdout + logs.stderr
            # reads were in flight at restarts: the holder handed them to the next service
            log = (data_root / "service" / "holder.log").read_text()
            handed = [int(n) for n in re.findall(r"resumed, (\d+) request\(s\) handed over", log)]
            assert len(handed) == 7 and sum(handed) > 0, log
        finally:
            _cleanup(data_root, config)


def test_a_config_change_takes_effect_across_restart_and_stop_names_the_containers(registry, image, data_root,
                                                                                    tmp_path):
    config = write_config(tmp_path / "config.yaml", background=True, quiet=0.5, interval_ms=50)
    ref = f"{registry.host}/restart/reader:latest"
    try:
        cid = _lz(data_root, config, "run", "-d", "--name", "keeps-running", "--snapshotter", "soci", ref,
                  "sleep", "600").stdout.strip()
        assert "background fetch: on" in _lz(data_root, config, "service", "status").stdout
        refused = _lz(data_root, config, "service", "stop", check=False)
        assert refused.returncode != 0 and "keeps-running" in refused.stderr, refused.stderr
        assert "--hand-over" in refused.stderr and "--force" in refused.stderr

        write_config(config, background=False)
        old = _service_pid(data_root)
        assert "running" in _lz(data_root, config, "service", "restart").stdout
        assert _service_pid(data_root) != old
        st = _lz(data_root, config, "service", "status").stdout
        assert "background fetch: off" in st and "restart/reader" in st, st
        assert "taken over" in st, st
        name = sorted(FILES)[5]
        r = _lz(data_root, config, "exec", cid, "sha256sum", f"/{name}")
        assert r.stdout.split()[0] == hashlib.sha256(FILES[name]).hexdigest()

        # a config the new process cannot use: the restart fails, the running service serves on
        serving = _service_pid(data_root)
        write_config(config, extra="  cache_max_bytes: lots\n")
        broken = _lz(data_root, config, "service", "restart", check=False)
        assert broken.returncode != 0 and "cache_max_bytes" in broken.stderr, broken.stderr
        write_config(config, background=False)
        assert _service_pid(data_root) == serving
        assert "running" in _lz(data_root, config, "service", "status").stdout

        # --hand-over: the service stops, the container waits for the next start
        assert "wait for the next start" in _lz(data_root, config, "service", "stop", "--hand-over").stdout
        st = _lz(data_root, config, "service", "status").stdout
        assert "not running" in st and "FUSE sessions are held" in st, st
        reader = subprocess.Popen([LAZYOCI, "--root", str(data_root), "--config", str(config), "exec", cid,
                                   "sha256sum", f"/{sorted(FILES)[7]}"], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert reader.poll() is None, "a read answered while no service ran"
        _lz(data_root, config, "service", "start")
        out, _ = reader.communicate(timeout=120)
        assert reader.returncode == 0 and out.split()[0] == hashlib.sha256(FILES[sorted(FILES)[7]]).hexdigest()
        assert _lz(data_root, config, "inspect", "-f", "{{.State.Status}}", cid).stdout.strip() == "running"
    finally:
        _cleanup(data_root, config)


def test_when_the_holder_dies_readers_get_errors_status_says_so_and_the_next_run_works(
        registry, image, data_root, tmp_path):
    config = write_config(tmp_path / "config.yaml")
    ref = f"{registry.host}/restart/reader:latest"
    try:
        cid = _lz(data_root, config, "run", "-d", "--snapshotter", "soci", ref, "sleep", "600").stdout.strip()
        holder = int((data_root / "service" / "holder.pid").read_text())
        service = _service_pid(data_root)
        st = _lz(data_root, config, "service", "status").stdout
        assert f"FUSE sessions held by pid {holder}" in st, st
        os.kill(holder, signal.SIGKILL)
        _wait_gone(holder)
        r = _lz(data_root, config, "exec", cid, "cat", f"/{sorted(FILES)[3]}", check=False, timeout=60)
        assert r.returncode != 0, "a read succeeded on a mount whose holder is dead"
        _wait_gone(service)                     # the service sees its channel close and stops
        st = _lz(data_root, config, "service", "status").stdout
        assert f"the FUSE session holder (pid {holder}) died" in st, st
        _lz(data_root, config, "rm", "-f", cid)
        name = sorted(FILES)[9]
        r = _lz(data_root, config, "run", "--rm", "--snapshotter", "soci", ref, "sha256sum", f"/{name}")
        assert r.stdout.split()[0] == hashlib.sha256(FILES[name]).hexdigest()
        assert "died" not in _lz(data_root, config, "service", "status").stdout
    finally:
        _cleanup(data_root, config)


def test_a_view_keeps_its_slot_for_good(tmp_path):
    """Node IDs carry the view's slot: the same view gets the same slot in every service process,
    whatever order the views are mounted in, and two views never share one."""
    from lazyoci.service.view_slots import view_slot
    from lazyoci.store.db import Database

    db = Database(tmp_path / "lazyoci.db")
    first = [view_slot(db, name) for name in ("a-1", "b-2", "c-3")]
    assert len(set(first)) == 3
    again = Database(tmp_path / "lazyoci.db")           # a new process: another connection
    assert [view_slot(again, name) for name in ("c-3", "a-1", "b-2")] == [first[2], first[0], first[1]]
    assert view_slot(again, "d-4") not in first


@pytest.mark.needs_root("the holder mounts FUSE")
def test_stopping_the_holder_detaches_its_mount_and_starts_no_service_again(tmp_path):
    """A holder told to stop while a service is still attached (one that did not say `leaving`)
    ends: it does not start that service again, which would mount afresh behind `service stop`."""
    from helpers.leaks import processes_under
    from lazyoci.service.holder_link import HolderPaths, attach, launch_holder, stop_holder
    from lazyoci.snapshot.mount_syscall import is_mountpoint

    paths = HolderPaths(tmp_path / "service")
    (paths.dir / "mnt").mkdir(parents=True)
    launch_holder(paths)
    assert is_mountpoint(paths.dir / "mnt") and is_mountpoint(paths.dir / "mnt-plain")
    relaunch = [sys.executable, "-c", "import time; time.sleep(600)", os.fspath(tmp_path / "started-again")]
    attachment = attach(paths, relaunch)
    try:
        assert stop_holder(paths)
    finally:
        os.close(attachment.fd)
    assert not is_mountpoint(paths.dir / "mnt") and not is_mountpoint(paths.dir / "mnt-plain")
    assert processes_under(tmp_path) == []


@pytest.mark.needs_root("the holder mounts FUSE")
def test_a_service_that_went_with_its_pid_file_removed_is_not_started_again(tmp_path):
    """A service that stops removes its pid file; if its `leaving` did not reach the holder (a
    control request the holder gave up waiting for), the holder still does not start it again
    behind `service stop`. A killed service leaves its pid file: that one is started again
    (test_a_reading_container_survives_restarts_and_kill_9_of_the_service)."""
    from helpers.leaks import processes_under
    from lazyoci.service.holder_link import HolderPaths, attach, holder_status, launch_holder, stop_holder

    paths = HolderPaths(tmp_path / "service")
    (paths.dir / "mnt").mkdir(parents=True)
    launch_holder(paths)
    try:
        relaunch = [sys.executable, "-c", "import time; time.sleep(600)", os.fspath(tmp_path / "started-again")]
        os.close(attach(paths, relaunch).fd)        # gone, without `leaving`, and no pid file names it
        while (status := holder_status(paths)) is not None and status["attached"]:
            time.sleep(0.01)
        assert status is not None and not status["attached"]
        assert processes_under(tmp_path / "started-again") == []
    finally:
        stop_holder(paths)
