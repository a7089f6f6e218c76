"""The service's life cycle: a killed service leaves a dead FUSE mount that the next start detaches."""

from __future__ import annotations

import os
import signal
import time

import pytest

from helpers.lazy import write_config
from lazyoci.service.client import ServiceClient
from lazyoci.store.layout import DataRoot

pytestmark = pytest.mark.needs_root("FUSE mounts")


def _mounted(path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def test_start_after_a_killed_service_and_socket_permissions(data_root, tmp_path):
    client = ServiceClient(DataRoot(data_root), write_config(tmp_path / "c.yaml"))
    try:
        first = client.start()
        assert oct(client.paths.socket.stat().st_mode & 0o777) == "0o600"
        assert oct(client.paths.dir.stat().st_mode & 0o777) == "0o700"
        os.kill(first["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while client.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _mounted(client.paths.mountpoint)          # dead, "transport endpoint is not connected"
        second = client.start()
        assert second["pid"] != first["pid"]
        assert os.listdir(client.paths.mountpoint) == []
    finally:
        client.stop(force=True)
    assert not _mounted(client.paths.mountpoint)
    assert not client.stop()                                 # stopping twice: "not running"


def test_stop_while_the_service_gets_ready_stops_it(data_root, tmp_path):
    """`service stop` just after the daemon detached, before it answers (it holds the pid file's
    lock while it starts the session holder and its mounts): it is asked to stop once it answers.
    It was not asked at all: the stop waited for it to end and failed after 30 s, the service
    running."""
    import subprocess
    import sys

    config = write_config(tmp_path / "c.yaml")
    client = ServiceClient(DataRoot(data_root), config)
    try:
        # the daemon's own launcher returns once the daemon has detached with the lock held
        subprocess.run([sys.executable, "-m", "lazyoci.service.daemon", "--root", str(data_root),
                        "--config", str(config)], check=True, stdin=subprocess.DEVNULL, timeout=60)
        assert client._daemon_alive()
        assert client.stop()
        assert not client._daemon_alive() and client.ping() is None
    finally:
        client.stop(force=True)
    assert not _mounted(client.paths.mountpoint)


def test_a_stop_during_a_restart_waits_for_it_and_leaves_nothing_running(data_root, tmp_path):
    """`service stop` while a `service restart` has its new process getting ready beside the old
    one: the stop waits for the restart, then stops the service it made. Interleaved, the stop
    shut the old process down, the new one took the service over and ran on, and the stop said
    it had stopped it (or waited 30 s for it and failed)."""
    import threading

    from lazyoci.service.holder_link import read_takeover

    config = write_config(tmp_path / "c.yaml")
    client = ServiceClient(DataRoot(data_root), config)
    restarted: list[dict] = []
    try:
        first = client.start()
        restart = threading.Thread(target=lambda: restarted.append(ServiceClient(DataRoot(data_root), config).restart()))
        restart.start()
        deadline = time.monotonic() + 60
        while read_takeover(client.holder) is None and restart.is_alive():   # the new process is getting ready
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert client.stop()
        restart.join()
        assert restarted and restarted[0]["pid"] != first["pid"]
        assert client.ping() is None and not client._daemon_alive()
        assert not _mounted(client.paths.mountpoint)
    finally:
        client.stop(force=True)


def test_a_changed_config_takes_effect_after_stop_and_start(data_root, tmp_path):
    config = write_config(tmp_path / "c.yaml", background=False,
                          extra="  cache_dir: span-cache\n  cache_max_bytes: 1048576\n")
    client = ServiceClient(DataRoot(data_root), config)
    try:
        st = client.start() and client.status()
        assert st["background_fetch"] is False and st["cache_max_bytes"] == 1 << 20
        assert (tmp_path / "span-cache").is_dir()          # relative to the config file
        write_config(config, background=True)
        client.start()                                     # already running: nothing changes
        assert client.status()["background_fetch"] is False
        client.stop()
        client.start()
        st = client.status()
        assert st["background_fetch"] is True and st["cache_max_bytes"] == 0
    finally:
        client.stop(force=True)


def test_concurrent_starts_make_one_service(data_root, tmp_path):
    import threading

    config = write_config(tmp_path / "c.yaml")
    pids: list[int] = []

    def start() -> None:
        pids.append(ServiceClient(DataRoot(data_root), config).start()["pid"])

    threads = [threading.Thread(target=start) for _ in range(4)]
    client = ServiceClient(DataRoot(data_root), config)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(pids) == 4 and len(set(pids)) == 1, pids
        with open("/proc/self/mountinfo") as f:
            assert sum(line.split()[4] == str(client.paths.mountpoint) for line in f) == 1
    finally:
        client.stop(force=True)


def test_after_kill_9_the_holder_starts_the_service_again_on_the_same_mount(data_root, tmp_path):
    """kill -9 of the service: the session holder starts it again by itself and the new one serves
    the same mount; `stop --hand-over` leaves the sessions waiting, which `status` says, until
    `service start`; `service stop` then leaves no mount and no process."""
    import subprocess
    import sys
    from pathlib import Path

    lazyoci = str(Path(sys.executable).parent / "lazyoci")
    config = write_config(tmp_path / "c.yaml")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([lazyoci, "--root", str(data_root), "--config", str(config), *args],
                              capture_output=True, text=True, timeout=120)

    client = ServiceClient(DataRoot(data_root), config)
    mnt = client.paths.mountpoint
    try:
        first = client.start()
        mount_id = _mount_id(mnt)
        os.kill(first["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (client.ping() or {}).get("pid") in (None, first["pid"]):
            assert time.monotonic() < deadline, "the service was not started again"
            time.sleep(0.05)
        assert os.listdir(mnt) == [] and _mount_id(mnt) == mount_id     # the same live mount
        # the holder is exempt from the OOM killer where root may say so (CAP_SYS_RESOURCE);
        # the service it started is not (the exemption would be inherited otherwise)
        exempt = subprocess.run(["sh", "-c", "echo -1000 > /proc/self/oom_score_adj"],
                                capture_output=True).returncode == 0
        holder = int((client.paths.dir / "holder.pid").read_text())
        assert open(f"/proc/{holder}/oom_score_adj").read().strip() == ("-1000" if exempt else "0")
        again = client.ping()["pid"]
        assert open(f"/proc/{again}/oom_score_adj").read().strip() == "0"
        r = cli("service", "status")
        assert "stale" not in r.stdout and "FUSE sessions held by pid" in r.stdout, r.stdout

        r = cli("service", "stop", "--hand-over")
        assert r.returncode == 0 and "wait for the next start" in r.stdout, r.stderr
        time.sleep(0.5)           # a service that left on purpose is not started again
        for args in (("service", "status"), ("vm", "status")):
            r = cli(*args)
            assert r.returncode == 0, r.stderr
            assert "not running" in r.stdout and "FUSE sessions are held" in r.stdout, r.stdout
            assert "lazyoci service start" in r.stdout and "stale" not in r.stdout, r.stdout
        r = cli("service", "start")
        assert r.returncode == 0 and "running" in r.stdout, r.stderr
        assert _mount_id(mnt) == mount_id
        assert cli("service", "stop").returncode == 0
        r = cli("service", "status")
        assert r.stdout.strip() == "lazyoci service is not running", r.stdout
    finally:
        client.stop(force=True)
        if _mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert not _mounted(mnt)


def _mount_id(mnt) -> str:
    """The kernel's ID of the mount at mnt (a new mount gets a new one)."""
    with open("/proc/self/mountinfo") as f:
        return next(line.split()[0] for line in f if line.split()[4] == str(mnt))
