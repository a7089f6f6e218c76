"""Invoking the OCI runtime (runc or crun) with its state under the data root."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lazyoci.config import RUNTIMES
from lazyoci.errors import ConfigError, ContainerError


@dataclass(frozen=True)
class Runtime:
    """One runtime binary and its --root (state) directory: <root>/runtime/<name>."""

    name: str
    binary: str
    state_root: Path

    @classmethod
    def find(cls, name: str, data_root: Path) -> "Runtime":
        if name not in RUNTIMES:
            raise ConfigError(f"unknown runtime {name!r} (supported: {', '.join(RUNTIMES)})")
        binary = shutil.which(name)
        if binary is None:
            raise ContainerError(f"the OCI runtime {name!r} is not installed (apt-get install {name})")
        return cls(name, binary, data_root / "runtime" / name)

    def cmd(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.state_root), *args]

    def run_cmd(self, container_id: str, bundle: Path, pid_file: Path) -> list[str]:
        """`run` in the foreground: the runtime waits for the container and exits with its status."""
        return self.cmd("run", "--bundle", str(bundle), "--pid-file", str(pid_file), container_id)

    def state(self, container_id: str) -> dict | None:
        """The runtime's view of a container, or None if it does not know it."""
        r = subprocess.run(self.cmd("state", container_id), capture_output=True, text=True)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def kill(self, container_id: str, signal: str = "TERM") -> bool:
        r = subprocess.run(self.cmd("kill", container_id, signal), capture_output=True, text=True)
        return r.returncode == 0

    def pids(self, container_id: str) -> set[int]:
        """The host PIDs of every process in the container (its cgroup), as the runtime lists them."""
        r = subprocess.run(self.cmd("ps", "--format", "json", container_id), capture_output=True, text=True)
        try:
            pids = json.loads(r.stdout) if r.returncode == 0 else None
        except ValueError:
            pids = None
        if not isinstance(pids, list):
            raise ContainerError(f"the runtime cannot list the processes of container {container_id[:12]}")
        return {p for p in pids if isinstance(p, int)}

    def delete(self, container_id: str) -> None:
        """Forget the container (force: also a stale one left by a crash or reboot)."""
        subprocess.run(self.cmd("delete", "--force", container_id), capture_output=True, text=True)

    def list_ids(self) -> list[str]:
        r = subprocess.run(self.cmd("list", "--format", "json"), capture_output=True, text=True)
        if r.returncode != 0 or not r.stdout.strip() or r.stdout.strip() == "null":
            return []
        return [c["id"] for c in json.loads(r.stdout)]
