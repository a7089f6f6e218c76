"""`kill -9` at random points: of the CLI during a pull, of the service during a lazy read.

The points are drawn from a seeded generator (the seed is in the test id, so a failure replays).
Afterwards nothing wrong is visible: the next pull succeeds, `images` is consistent and every
stored blob verifies; a read cut by the service's death waits, and the next `service start`
answers it with the right bytes, also through an overlay mounted on it as a container's root
filesystem is.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.fault_proxy import Fault, FaultProxy
from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import overlay, running_service, store_ztoc, write_config, ztoc_for
from helpers.store_check import assert_store_consistent

pytestmark = pytest.mark.needs_root("FUSE and overlay mounts")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
FILES = {f"data/f{i}.bin": os.urandom(256 << 10) for i in range(6)}


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    """Three layers (so a pull has several blobs in flight), six 256 KiB files in the last."""
    work = tmp_path_factory.mktemp("kill")
    base = make_layer([Entry("etc/", kind="dir"), Entry("etc/os-release", data=b"ID=kill\n" * 4000)])
    mid = make_layer([Entry("opt/", kind="dir"), Entry("opt/blob.bin", data=os.urandom(1 << 20))])
    top = make_layer([Entry("data/", kind="dir")] + [Entry(n, data=d) for n, d in FILES.items()])
    push_image(registry.host, "hardening/kill", [base, mid, top], image_config([base, mid, top]), work)
    return [base, mid, top]


def _lz(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([LAZYOCI, "--root", str(root), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_of_pull_at_a_random_point_then_pull_again(registry, image, tmp_path, seed):
    rng = random.Random(seed)
    root = tmp_path / "root"
    with FaultProxy(registry.host) as proxy:
        # every GET waits a second (a pull makes three: manifest, config, layer), so the pull lasts
        # 3 s or more and the kill, at 0.2-2 s, lands inside it
        proxy.add(Fault("delay", method="GET", seconds=1.0, times=None))
        ref = f"{proxy.host}/hardening/kill:latest"
        pull = subprocess.Popen([LAZYOCI, "--root", str(root), "pull", ref],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 2.0))
        pull.send_signal(signal.SIGKILL)
        assert pull.wait(30) == -signal.SIGKILL, "the pull ended before the kill"
        proxy.clear()
        again = _lz(root, "pull", ref)
        assert again.returncode == 0, again.stderr
    listed = _lz(root, "images")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("hardening/kill") == 1, listed.stdout
    for layer in image:
        assert (root / "blobs/sha256" / layer.digest.split(":")[1]).read_bytes() == layer.blob
    inspect = _lz(root, "image", "inspect", ref)
    assert inspect.returncode == 0, inspect.stderr
    # partial files of the killed pull are the next test's subject (they are never blobs)
    assert_store_consistent(root, allow_partial_files=True)


def test_kill_9_of_pull_mid_blob_leaves_no_partial_file_after_the_next_pull(registry, image, tmp_path):
    root = tmp_path / "root"
    big = image[1]
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("drip", match=f"/blobs/{big.digest}", method="GET", rate=5.0, times=None))
        ref = f"{proxy.host}/hardening/kill:latest"
        pull = subprocess.Popen([LAZYOCI, "--root", str(root), "pull", ref],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not list((root / "tmp").glob("*")):       # the dripping blob's partial file
            assert time.monotonic() < deadline and pull.poll() is None, "the pull never started the blob"
            time.sleep(0.05)
        time.sleep(0.5)
        pull.send_signal(signal.SIGKILL)
        pull.wait(30)                            # the drip ends with its client
    assert _lz(root, "pull", f"{registry.host}/hardening/kill:latest").returncode == 0
    assert list((root / "tmp").iterdir()) == [], "stale partial files were left in tmp/"


def _service_pid(client) -> int:
    return int(client.paths.pid_file.read_text().strip())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_of_service_during_a_lazy_read_then_restart_serves_right_bytes(
        registry, image, data_root, tmp_path, seed):
    rng = random.Random(seed)
    top = image[-1]
    zdigest = store_ztoc(data_root, ztoc_for(top, span_size=64 << 10))
    config = write_config(tmp_path / "c.yaml")
    name = rng.choice(sorted(FILES))
    merged = tmp_path / "merged"
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("delay", match=f"/blobs/{top.digest}", method="GET", seconds=0.2, times=None))
        with running_service(data_root, config) as client:
            d = client.mount_layer(f"{proxy.host}/hardening/kill:latest", top.digest, zdigest)
            with overlay([d], merged):
                reader = subprocess.Popen([sys.executable, "-c", f"import sys; sys.stdout.buffer.write("
                                           f"open({str(merged / name)!r}, 'rb').read())"],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                time.sleep(rng.uniform(0.05, 1.0))
                os.kill(_service_pid(client), signal.SIGKILL)
                proxy.clear()
                # the session holder keeps the mount: the read waits for the next start, which
                # answers what the killed service had taken and not answered
                client.start()
                out, err = reader.communicate(timeout=60)
                assert reader.returncode == 0, err
                assert out == FILES[name]
            assert (d / name).read_bytes() == FILES[name]
            assert all((d / n).read_bytes() == data for n, data in FILES.items())
            with overlay([d], merged):           # a container's root filesystem over the layer
                assert (merged / name).read_bytes() == FILES[name]
