"""A real containerd (Debian's) for one test: its own config, root, state and socket.

Tools that work through containerd (`ctr`, `ctr-remote images convert --estargz`) talk
to it over the socket this returns. Nothing is shared with a containerd the machine
may run: the CRI plugin is off, every directory lies under the test's temporary path,
and the daemon is stopped by its PID.

    with running_containerd(tmp_path / "containerd") as cd:
        cd.ctr("images", "pull", "--plain-http", ref)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

_CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"""


@dataclass
class Containerd:
    socket: Path
    proc: subprocess.Popen
    log: Path
    namespace: str = "lazyoci-test"

    def run(self, tool: str, *args: str, timeout: float = 300) -> str:
        """Run `tool` (ctr, ctr-remote) against this containerd; its stdout, or an error with its output."""
        cmd = [tool, "--address", str(self.socket), "--namespace", self.namespace, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def ctr(self, *args: str, timeout: float = 300) -> str:
        return self.run("ctr", *args, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_containerd(workdir: Path) -> Containerd:
    """Start containerd with everything under `workdir`; wait until its socket answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    dirs = {name: workdir / name for name in ("root", "state", "opt")}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    socket = workdir / "containerd.sock"
    config = workdir / "config.toml"
    config.write_text(_CONFIG.format(socket=socket, **{k: str(v) for k, v in dirs.items()}))
    log = workdir / "containerd.log"
    proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    cd = Containerd(socket, proc, log)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"containerd exited ({proc.returncode}): {log.read_text()[-2000:]}")
        if socket.exists():
            try:
                cd.ctr("version", timeout=10)
                return cd
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        if time.monotonic() > deadline:
            cd.stop()
            raise RuntimeError(f"containerd did not answer on {socket}: {log.read_text()[-2000:]}")
        time.sleep(0.2)


@contextmanager
def running_containerd(workdir: Path) -> Iterator[Containerd]:
    """containerd for the duration of the block; stopped by its PID whatever happens."""
    cd = start_containerd(workdir)
    try:
        yield cd
    finally:
        cd.stop()
        _unmount_below(workdir)


def _unmount_below(workdir: Path) -> None:
    """containerd mounts nothing for content-only work; if it left a mount, detach it."""
    prefix = os.fspath(workdir.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    for target in reversed(targets):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)
