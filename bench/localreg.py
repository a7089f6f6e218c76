"""Local processes the bench and the demo need: docker-registry and the throttling proxy.

Both listen on free loopback ports, keep their files under a directory of the caller,
and are stopped by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Registry:
    host: str                 # "127.0.0.1:PORT"
    storage: Path
    proc: subprocess.Popen

    def stop(self) -> None:
        _stop(self.proc)


def start_registry(workdir: Path) -> Registry:
    """docker-registry (Debian's CNCF distribution) with its own storage under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                            stdout=open(workdir / "registry.log", "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError("docker-registry did not start; see " + str(workdir / "registry.log"))
            time.sleep(0.05)
    return Registry(f"127.0.0.1:{port}", storage, proc)


@dataclass
class Proxy:
    host: str
    proc: subprocess.Popen
    rate_mbs: float
    latency_ms: float

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://{self.host}/_proxy/stats", timeout=10) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        req = urllib.request.Request(f"http://{self.host}/_proxy/reset", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        _stop(self.proc)


def start_proxy(upstream: str, rate_mbs: float, latency_ms: float, workdir: Path,
                max_seconds: float = 6 * 3600, request_log: Path | None = None, nagle: bool = False) -> Proxy:
    """bench/throttle_proxy.py in front of `upstream` (`request_log`: one JSON line per request;
    `nagle`: its sockets without TCP_NODELAY, as it was before)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"proxy-{os.getpid()}-{time.monotonic_ns()}.port"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "throttle_proxy.py"), "--upstream", upstream,
         "--rate-mbs", str(rate_mbs), "--latency-ms", str(latency_ms),
         "--port-file", str(port_file), "--max-seconds", str(max_seconds),
         *(["--request-log", str(request_log)] if request_log else []),
         *(["--nagle"] if nagle else [])],
        stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError("throttle_proxy did not start")
        time.sleep(0.05)
    port = int(port_file.read_text())
    port_file.unlink()
    return Proxy(f"127.0.0.1:{port}", proc, rate_mbs, latency_ms)


def skopeo_push_layout(layout: Path, ref: str) -> None:
    """Copy an OCI image layout to the registry with skopeo (an independent tool), digests kept."""
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci:{layout}:latest", f"docker://{ref}"], check=True)
