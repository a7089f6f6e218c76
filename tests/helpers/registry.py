"""A real CNCF distribution registry (Debian `docker-registry`) on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RegistryProcess:
    host: str            # "127.0.0.1:PORT", what image references use
    storage: Path        # the registry's filesystem storage root
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def blob_path(self, digest: str) -> Path:
        """Where the registry stores a blob's bytes (for corruption tests)."""
        algo, hexd = digest.split(":", 1)
        return self.storage / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_registry(workdir: Path, htpasswd: Path | None = None,
                   token_auth: dict | None = None) -> RegistryProcess:
    """Start docker-registry with its own storage under `workdir`; wait until /v2/ answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    auth = ""
    if htpasswd is not None:
        auth = f"auth:\n  htpasswd:\n    realm: lazyoci-test\n    path: {htpasswd}\n"
    elif token_auth is not None:
        auth = ("auth:\n  token:\n"
                f"    realm: {token_auth['realm']}\n"
                f"    service: {token_auth['service']}\n"
                f"    issuer: {token_auth['issuer']}\n"
                f"    rootcertbundle: {token_auth['rootcertbundle']}\n")
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: false\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {storage}\n"
        "  delete:\n    enabled: true\n"
        "  cache:\n    blobdescriptor: inmemory\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        + auth
    )
    log = workdir / "registry.log"
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except urllib.error.HTTPError:
            break  # 401 from an auth-enabled registry: it is up
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"docker-registry did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
    return RegistryProcess(f"127.0.0.1:{port}", storage, proc, log)
