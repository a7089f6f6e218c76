"""A real containerd (Debian's 1.6) for one test: its own config, root, state and socket.

Everything lives in one short temporary directory under /tmp (unix socket paths are
limited to 108 bytes): config.toml, root/, state/, containerd.sock, the log. `extra`
is appended to the config (e.g. a `[proxy_plugins.soci]` table). The CRI plugin is off
unless asked for. Stopping ends the shims this containerd started (found by its socket
in their command line) by PID, then containerd by PID, then unmounts whatever is still
mounted below the directory and removes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ContainerdDaemon:
    dir: Path
    proc: subprocess.Popen
    namespace: str = "lazyoci-test"
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.dir / "containerd.log"

    @property
    def address(self) -> str:
        return str(self.dir / "containerd.sock")

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run `ctr` against this containerd, in the test's namespace."""
        r = subprocess.run(["ctr", "--address", self.address, "--namespace", self.namespace, *args],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}\n"
                                 f"containerd log:\n{self.log_tail()}")
        return r

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def shim_pids(self) -> list[int]:
        """The shims started by this containerd (their command line names its socket)."""
        out = []
        needle = self.address.encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.proc.pid:
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline and b"containerd-shim" in cmdline:
                out.append(int(entry))
        return out

    def mounts_below(self) -> list[str]:
        prefix = str(self.dir) + "/"
        with open("/proc/self/mountinfo") as f:
            targets = [line.split()[4] for line in f]
        return [t for t in targets if t.startswith(prefix)]

    def stop(self) -> None:
        for pid in self.shim_pids():
            _kill(pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.shim_pids():      # a shim started while containerd stopped
            _kill(pid)
        for target in sorted(self.mounts_below(), key=len, reverse=True):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(200):
        if not Path(f"/proc/{pid}").exists():
            return
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except OSError:
            return
        time.sleep(0.05)


def start_containerd(extra: str = "", cri: bool = False, namespace: str = "lazyoci-test") -> ContainerdDaemon:
    """Start containerd with everything under a fresh directory; wait until `ctr version` answers."""
    d = Path(tempfile.mkdtemp(prefix="lzctrd.", dir="/tmp"))
    os.chmod(d, 0o711)
    disabled = [] if cri else ['"io.containerd.grpc.v1.cri"']
    config = d / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{d}/root"\n'
        f'state = "{d}/state"\n'
        f"disabled_plugins = [{', '.join(disabled)}]\n"
        "[grpc]\n"
        f'  address = "{d}/containerd.sock"\n'
        "[ttrpc]\n"
        f'  address = "{d}/containerd.sock.ttrpc"\n'
        "[debug]\n"
        f'  address = "{d}/debug.sock"\n'
        '  level = "info"\n'
        "[metrics]\n"
        '  address = ""\n'
        '[plugins."io.containerd.internal.v1.opt"]\n'
        f'  path = "{d}/opt"\n'
        + extra)
    log = open(d / "containerd.log", "wb")
    proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    log.close()
    daemon = ContainerdDaemon(d, proc, namespace)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            tail = daemon.log_tail()
            daemon.stop()
            raise RuntimeError(f"containerd exited ({proc.returncode}):\n{tail}")
        r = subprocess.run(["ctr", "--address", daemon.address, "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return daemon
        if time.monotonic() > deadline:
            tail = daemon.log_tail()
            daemon.stop()
            raise RuntimeError(f"containerd did not answer within 60 s:\n{tail}")
        time.sleep(0.2)
