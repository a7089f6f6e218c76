"""Lazy reads from a stalling or slow registry, through the real service and FUSE.

The fault proxy's "drip" fault sends a span's bytes at a given rate. Files are
read by child processes with a generous bound (a hung read fails the test, and
a killed reader never holds the mount), and `soci.fetch_*` in the config keeps
the deadlines short.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.fault_proxy import Fault, FaultProxy
from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import running_service, store_ztoc, write_config, ztoc_for

pytestmark = pytest.mark.needs_root("FUSE mounts")

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
STALL = 0.05            # bytes per second: one byte every 20 s
DEADLINE = 4.0          # soci.fetch_timeout_seconds of these tests
FILE = 200 << 10
_READ = "import sys\nwith open(sys.argv[1], 'rb') as f:\n    sys.stdout.buffer.write(f.read())\n"


@pytest.fixture(scope="module")
def small(registry, tmp_path_factory):
    """Six random 200 KiB files in one gzip layer, 64 KiB spans (a span = one small Range request)."""
    work = tmp_path_factory.mktemp("stalls")
    layer = make_layer([Entry(f"f{i}.bin", data=os.urandom(FILE)) for i in range(6)], "gzip")
    push_image(registry.host, "lazy/stalls", [layer], image_config([layer]), work)
    return layer, ztoc_for(layer, span_size=64 << 10)


def fetch_config(path: Path, timeout: float = DEADLINE, window: float = 1.0, rate: int = 16384) -> Path:
    return write_config(path, extra=f"  fetch_timeout_seconds: {timeout}\n"
                                    f"  fetch_rate_window_seconds: {window}\n"
                                    f"  fetch_min_bytes_per_second: {rate}\n")


def start_read(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _READ, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish_read(proc: subprocess.Popen, bound: float) -> tuple[int, bytes, str]:
    """(exit status, bytes read, stderr) of a reader, killed and failed if it runs past `bound`."""
    try:
        out, err = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the read was still blocked after {bound:.0f}s")
    return proc.returncode, out, err.decode(errors="replace")


def wait_applied(fault: Fault, bound: float = 30.0) -> None:
    deadline = time.monotonic() + bound
    while fault.applied == 0:
        assert time.monotonic() < deadline, "the span request never reached the proxy"
        time.sleep(0.02)


def test_a_stalled_span_fetch_ends_in_eio_within_the_deadline(registry, small, data_root, tmp_path):
    layer, ztoc = small
    zdigest = store_ztoc(data_root, ztoc)
    with FaultProxy(registry.host) as proxy, \
            running_service(data_root, fetch_config(tmp_path / "c.yaml")) as client:
        d = client.mount_layer(f"{proxy.host}/lazy/stalls:latest", layer.digest, zdigest)
        proxy.add(Fault("drip", match=layer.digest, method="GET", rate=STALL, times=None))
        started = time.monotonic()
        status, out, err = finish_read(start_read(d / "f1.bin"), 10 * DEADLINE)
        took = time.monotonic() - started
        assert status != 0 and out == b"" and "Input/output error" in err, err
        assert took < 3 * DEADLINE, f"the stalled read took {took:.1f}s"
        log = client.paths.log_file.read_text()
        assert f"no complete answer within {DEADLINE:g}s" in log or "range read failed" in log, log[-2000:]
        # the registry recovers: the spans of another file read fine
        proxy.clear()
        assert (d / "f5.bin").read_bytes() == _file(layer, "f5.bin")


def test_a_slow_but_moving_link_serves_the_read(registry, small, data_root, tmp_path):
    """Four times the minimum rate, for longer than a rate window: nothing is cut."""
    layer, ztoc = small
    zdigest = store_ztoc(data_root, ztoc)
    config = fetch_config(tmp_path / "c.yaml", timeout=60, window=0.5, rate=32 << 10)
    with FaultProxy(registry.host) as proxy, running_service(data_root, config) as client:
        d = client.mount_layer(f"{proxy.host}/lazy/stalls:latest", layer.digest, zdigest)
        slow = proxy.add(Fault("drip", match=layer.digest, method="GET", rate=128 << 10, times=None))
        status, out, err = finish_read(start_read(d / "f2.bin"), 120)
        assert status == 0, err
        assert out == _file(layer, "f2.bin")
        assert slow.applied >= 2       # several spans, each longer than a window on this link
        assert "failed" not in client.paths.log_file.read_text()


def test_a_span_fetch_stalled_once_is_retried_and_served(registry, small, data_root, tmp_path):
    layer, ztoc = small
    zdigest = store_ztoc(data_root, ztoc)
    with FaultProxy(registry.host) as proxy, \
            running_service(data_root, fetch_config(tmp_path / "c.yaml", timeout=30)) as client:
        d = client.mount_layer(f"{proxy.host}/lazy/stalls:latest", layer.digest, zdigest)
        stall = proxy.add(Fault("drip", match=layer.digest, method="GET", rate=STALL, times=1))
        status, out, err = finish_read(start_read(d / "f3.bin"), 120)
        assert status == 0, err
        assert out == _file(layer, "f3.bin")
        assert stall.applied == 1
        assert proxy.count(method="GET", match=layer.digest) >= 2


def test_service_stop_while_a_read_is_stalled_returns_within_seconds(registry, data_root, tmp_path):
    """A 4 MiB span moving at 20 KiB/s (above the default minimum rate: a slow link, not a stall)
    keeps a read waiting for minutes; `service stop` cancels it: EIO, no mount left."""
    layer = make_layer([Entry("big.bin", data=os.urandom(8 << 20))], "gzip")
    push_image(registry.host, "lazy/stalls-stop", [layer], image_config([layer]), tmp_path)
    zdigest = store_ztoc(data_root, ztoc_for(layer, span_size=4 << 20))
    config = write_config(tmp_path / "c.yaml")          # the default fetch limits
    mnt = data_root / "service" / "mnt"
    with FaultProxy(registry.host) as proxy, running_service(data_root, config) as client:
        d = client.mount_layer(f"{proxy.host}/lazy/stalls-stop:latest", layer.digest, zdigest)
        slow = proxy.add(Fault("drip", match=layer.digest, method="GET", rate=20 << 10, times=None))
        reader = start_read(d / "big.bin")
        try:
            wait_applied(slow)
            time.sleep(1.0)                              # the span's bytes are on their way
            started = time.monotonic()
            stop = subprocess.run([LAZYOCI, "--root", str(data_root), "--config", str(config),
                                   "service", "stop"], capture_output=True, text=True, timeout=120)
            took = time.monotonic() - started
        finally:
            status, out, err = finish_read(reader, 60)
        assert stop.returncode == 0, stop.stderr
        assert "stopped" in stop.stdout
        assert took < 15, f"service stop took {took:.1f}s"
        assert status != 0 and out == b"", "the reader got bytes of a span that was never fetched"
        assert "Input/output error" in err, err
        assert f" {mnt} " not in Path("/proc/self/mountinfo").read_text()
        assert not client.is_running()


def _file(layer, name: str) -> bytes:
    import gzip
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.blob))) as tar:
        return tar.extractfile(name).read()


def test_service_stop_while_the_background_fetcher_is_stalled(registry, small, data_root, tmp_path):
    """No reader at all: the background fetcher's request hangs on the registry, and the service
    still stops within seconds (the fetcher's thread must not hold it)."""
    layer, ztoc = small
    zdigest = store_ztoc(data_root, ztoc)
    config = write_config(tmp_path / "c.yaml", background=True, quiet=0.2, interval_ms=5)
    with FaultProxy(registry.host) as proxy, running_service(data_root, config) as client:
        slow = proxy.add(Fault("drip", match=layer.digest, method="GET", rate=STALL, times=None))
        client.mount_layer(f"{proxy.host}/lazy/stalls:latest", layer.digest, zdigest)
        wait_applied(slow)
        time.sleep(0.5)
        started = time.monotonic()
        assert client.stop()
        took = time.monotonic() - started
        assert took < 15, f"service stop took {took:.1f}s"
        assert not client.is_running()


def test_service_stop_while_the_registry_never_answers(registry, small, data_root, tmp_path):
    """The registry takes the Range request and never sends headers: the fetch waits at most one
    rate window for them (5 s by default), the read gets EIO, the service stops within seconds."""
    layer, ztoc = small
    zdigest = store_ztoc(data_root, ztoc)
    config = write_config(tmp_path / "c.yaml")          # the default fetch limits
    with FaultProxy(registry.host) as proxy, running_service(data_root, config) as client:
        d = client.mount_layer(f"{proxy.host}/lazy/stalls:latest", layer.digest, zdigest)
        silent = proxy.add(Fault("delay", match=layer.digest, method="GET", seconds=120, times=None))
        reader = start_read(d / "f0.bin")
        try:
            wait_applied(silent)
            started = time.monotonic()
            assert client.stop()
            took = time.monotonic() - started
        finally:
            status, out, err = finish_read(reader, 60)
        assert took < 15, f"service stop took {took:.1f}s"
        assert status != 0 and out == b"" and "Input/output error" in err, err
