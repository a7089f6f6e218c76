"""Stalling and slow registries at the client: deadlines, minimum rates, Retry-After, cancellation.

A real registry behind the fault proxy, whose "drip" fault sends a body at a
given rate. Each transfer runs in a thread joined with a generous bound, so a
client that hangs fails the test instead of holding the suite.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from typing import Callable

import pytest

from helpers.fault_proxy import Fault, FaultProxy
from lazyoci.errors import RegistryError
from lazyoci.oci.reference import Reference
from lazyoci.registry import RegistryClient, RegistryOptions
from lazyoci.registry.options import TransferLimits

BLOB = os.urandom(256 * 1024)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
STALL = 0.05          # bytes per second: one byte every 20 s
HANG = 120.0          # a transfer still running after this long is hung


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr("lazyoci.registry.transport._BASE_BACKOFF", 0.02)


@pytest.fixture(scope="module")
def seeded(registry, tmp_path_factory):
    ref = Reference.parse(f"{registry.host}/stalls/app:v1")
    with RegistryClient(RegistryOptions(docker_config=tmp_path_factory.mktemp("cfg") / "c.json")) as c:
        c.push_blob(ref, DIGEST, len(BLOB), lambda: io.BytesIO(BLOB))


@pytest.fixture
def proxy(registry, seeded):
    with FaultProxy(registry.host) as p:
        yield p


def client_with(tmp_path, **limits: TransferLimits) -> RegistryClient:
    return RegistryClient(RegistryOptions(docker_config=tmp_path / "c.json", **limits))


def ref_via(proxy: FaultProxy) -> Reference:
    return Reference.parse(f"{proxy.host}/stalls/app:v1")


def run_bounded(work: Callable[[], object], bound: float = HANG) -> tuple[object, float]:
    """(result or raised exception, seconds taken); fails the test if `work` is still running
    after `bound` seconds (the thread is a daemon: a hung transfer cannot hold the suite)."""
    out: list[object] = []

    def target() -> None:
        try:
            out.append(work())
        except BaseException as e:   # handed to the test
            out.append(e)

    started = time.monotonic()
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(bound)
    assert not t.is_alive(), f"the transfer was still running after {bound:.0f}s"
    return out[0], time.monotonic() - started


def wait_applied(fault: Fault, bound: float = 30.0) -> None:
    deadline = time.monotonic() + bound
    while fault.applied == 0:
        assert time.monotonic() < deadline, "the request never reached the proxy"
        time.sleep(0.02)


def test_a_stalled_range_read_fails_within_its_deadline(proxy, tmp_path):
    limits = TransferLimits(deadline=3.0, min_bytes_per_second=4096, rate_window=1.0)
    proxy.add(Fault("drip", match="/blobs/", method="GET", rate=STALL, times=None))
    with client_with(tmp_path, range_limits=limits) as client:
        result, took = run_bounded(lambda: client.fetch_range(ref_via(proxy), DIGEST, 0, 64 * 1024))
    assert isinstance(result, RegistryError), result
    assert DIGEST in str(result) and "bytes 0-65535" in str(result)
    assert took < 3 * limits.deadline, f"gave up after {took:.1f}s"


def test_a_slow_but_moving_range_read_is_not_cut(proxy, tmp_path):
    """Three windows long at twice the minimum rate: served whole."""
    limits = TransferLimits(deadline=30.0, min_bytes_per_second=48 * 1024, rate_window=1.0)
    drip = proxy.add(Fault("drip", match="/blobs/", method="GET", rate=96 * 1024, times=None))
    with client_with(tmp_path, range_limits=limits) as client:
        result, _ = run_bounded(lambda: client.fetch_range(ref_via(proxy), DIGEST, 0, len(BLOB)))
    assert result == BLOB
    assert drip.applied == 1


def test_a_range_read_stalled_once_is_retried(proxy, tmp_path):
    limits = TransferLimits(deadline=30.0, min_bytes_per_second=4096, rate_window=1.0)
    stall = proxy.add(Fault("drip", match="/blobs/", method="GET", rate=STALL, times=1))
    with client_with(tmp_path, range_limits=limits) as client:
        result, _ = run_bounded(lambda: client.fetch_range(ref_via(proxy), DIGEST, 1000, 70000))
    assert result == BLOB[1000:70000]
    assert stall.applied == 1
    assert proxy.count(method="GET", match="/blobs/") == 2


def test_retry_after_is_honoured_within_the_deadline_and_not_past_it(proxy, tmp_path):
    limits = TransferLimits(deadline=5.0, min_bytes_per_second=4096, rate_window=1.0)
    with client_with(tmp_path, range_limits=limits) as client:
        busy = proxy.add(Fault("status", status=429, headers={"Retry-After": "1"}, match="/blobs/", times=1))
        result, _ = run_bounded(lambda: client.fetch_range(ref_via(proxy), DIGEST, 0, 100))
        assert result == BLOB[:100] and busy.applied == 1
        assert proxy.count(method="GET", match="/blobs/") == 2     # the pause is not held against the body
        # a registry that asks for a pause longer than the time left: its answer, at once
        proxy.add(Fault("status", status=429, headers={"Retry-After": "8"}, match="/blobs/", times=None))
        result, took = run_bounded(lambda: client.fetch_range(ref_via(proxy), DIGEST, 0, 100))
    assert isinstance(result, RegistryError) and result.status == 429, result
    assert took < limits.deadline, f"waited {took:.1f}s for a Retry-After past the deadline"


def test_cancel_ends_a_stalled_range_read_at_once(proxy, tmp_path):
    """No deadline to save it: only the client's cancellation ends the transfer."""
    limits = TransferLimits(deadline=None, min_bytes_per_second=0, rate_window=60.0)
    stall = proxy.add(Fault("drip", match="/blobs/", method="GET", rate=STALL, times=None))
    with client_with(tmp_path, range_limits=limits) as client:
        threading.Thread(target=lambda: (wait_applied(stall), time.sleep(0.5), client.cancel()),
                         daemon=True).start()
        result, took = run_bounded(lambda: client.fetch_range(ref_via(proxy), DIGEST, 0, 64 * 1024), 60)
        assert isinstance(result, RegistryError) and "cancelled" in str(result), result
        later, _ = run_bounded(lambda: client.fetch_range(ref_via(proxy), DIGEST, 0, 100), 10)
    assert isinstance(later, RegistryError) and "cancelled" in str(later), later
    assert stall.applied == 1


def test_a_full_download_resumes_after_a_stall_and_takes_a_slow_link(proxy, tmp_path):
    """Whole blobs have a minimum rate but no deadline: a stall is resumed with Range."""
    limits = TransferLimits(deadline=None, min_bytes_per_second=16 * 1024, rate_window=1.0)
    stall = proxy.add(Fault("drip", match="/blobs/", method="GET", rate=STALL, times=1))
    slow = proxy.add(Fault("drip", match="/blobs/", method="GET", rate=64 * 1024, times=1))
    with client_with(tmp_path, blob_limits=limits) as client:
        result, _ = run_bounded(lambda: b"".join(client.iter_blob(ref_via(proxy), DIGEST, len(BLOB))))
    assert result == BLOB
    assert stall.applied == 1 and slow.applied == 1


def test_a_range_read_moving_too_slowly_for_its_deadline_ends_at_the_deadline(proxy, tmp_path):
    """Above the minimum rate, but 256 KiB at 32 KiB/s needs 8 s: the 3 s deadline ends it."""
    limits = TransferLimits(deadline=3.0, min_bytes_per_second=4096, rate_window=1.0)
    proxy.add(Fault("drip", match="/blobs/", method="GET", rate=32 * 1024, times=None))
    with client_with(tmp_path, range_limits=limits) as client:
        result, took = run_bounded(lambda: client.fetch_range(ref_via(proxy), DIGEST, 0, len(BLOB)))
    assert isinstance(result, RegistryError) and "within 3s" in str(result), result
    assert took < 2 * limits.deadline, f"the deadline was passed by {took - limits.deadline:.1f}s"


def test_fetch_limits_come_from_the_soci_section_of_the_config(tmp_path):
    from lazyoci.config import SociConfig, load_config
    from lazyoci.errors import ConfigError
    from lazyoci.registry.options import RANGE_LIMITS

    default = SociConfig()       # one set of defaults, documented twice
    assert (default.fetch_timeout_seconds, default.fetch_min_bytes_per_second, default.fetch_rate_window_seconds) \
        == (RANGE_LIMITS.deadline, RANGE_LIMITS.min_bytes_per_second, RANGE_LIMITS.rate_window)
    path = tmp_path / "c.yaml"
    path.write_text("soci:\n  fetch_timeout_seconds: 12\n  fetch_min_bytes_per_second: 1000\n"
                    "  fetch_rate_window_seconds: 2.5\n")
    soci = load_config(path).soci
    assert (soci.fetch_timeout_seconds, soci.fetch_min_bytes_per_second, soci.fetch_rate_window_seconds) \
        == (12, 1000, 2.5)
    path.write_text("soci:\n  background_fetch: true\n  fetch_rate_window_seconds: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: soci\.fetch_rate_window_seconds must be more than 0"):
        load_config(path)
