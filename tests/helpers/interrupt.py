"""A `lazyoci pull` interrupted mid-download, for the tests that check what it leaves behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.fault_proxy import Fault, FaultProxy

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def start_dripping_pull(root: Path, ref: str, proxy: FaultProxy, layer_digest: str,
                        ctrl_c: bool = True) -> subprocess.Popen:
    """Start pulling `ref` (through `proxy`) into `root`, the layer's body dripping so that it
    takes seconds; return once the layer's temporary file has appeared (mid-download)."""
    proxy.add(Fault("drip", rate=200_000, match=f"/blobs/{layer_digest}", method="GET"))
    # Ctrl-C's default, as at a terminal: a suite started in the background inherits SIGINT
    # ignored, and a Python program keeps an ignored SIGINT ignored (as a shell's `&` wants)
    p = subprocess.Popen([LAZYOCI, "--root", str(root), "pull", ref],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if ctrl_c else None)
    # the layer's own: the manifest's and the config's come and go before it (store/blobs.py
    # names a temporary file after the first 16 hex digits of the digest it is written for)
    label = layer_digest.split(":")[1][:16] + "."
    deadline = time.monotonic() + 20
    while not (root / "tmp").is_dir() or not any(f.name.startswith(label) for f in (root / "tmp").iterdir()):
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.02)
    return p


def interrupt_pull(root: Path, ref: str, proxy: FaultProxy, layer_digest: str,
                   how: str) -> tuple[subprocess.Popen, str, str]:
    """A dripping pull (start_dripping_pull) sent SIGINT (Ctrl-C) or SIGKILL mid-download (`how`:
    "sigint" or "sigkill"). Returns the process and its stdout and stderr."""
    p = start_dripping_pull(root, ref, proxy, layer_digest)
    p.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
    out, err = p.communicate(timeout=30)
    return p, out, err
