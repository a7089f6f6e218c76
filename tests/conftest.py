"""Shared fixtures: real registries on loopback, temporary data roots; the `needs_root` marker.

A test that mounts (overlayfs, FUSE, tmpfs), runs runc or unpacks layers owned by
other users is marked `@pytest.mark.needs_root("what needs it")` (a module: `pytestmark`);
run by another user it is skipped with that reason, and the rest of the suite runs.

A test that leaves a mount or a process (the service, its FUSE session holder, a container)
under its `tmp_path` fails at teardown, and so does the session for what its module fixtures
left under the session's temporary directory; what was left is cleared then.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.leaks import clear, settle
from helpers.registry import RegistryProcess, start_registry


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("needs_root")
    if marker is not None and os.geteuid() != 0:
        why = marker.args[0] if marker.args else "it needs root"
        pytest.skip(f"needs root: {why}")


def _fail_if_left(path: Path, who: str) -> None:
    left = settle(path)
    if left:
        clear(path)
        pytest.fail(f"{who} left behind: " + "; ".join(left), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _session_leaves_nothing(tmp_path_factory):
    """Module and session fixtures (their data roots, registries) clean up after themselves."""
    yield
    _fail_if_left(tmp_path_factory.getbasetemp(), "the session")


@pytest.fixture(autouse=True)
def _test_leaves_nothing(request):
    """Every mount a test made below its tmp_path is gone, and every process it started there."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    path = request.getfixturevalue("tmp_path")
    yield
    _fail_if_left(path, request.node.nodeid)


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> RegistryProcess:
    """One anonymous docker-registry for the whole session (tests use unique repository names)."""
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture
def fresh_registry(tmp_path) -> RegistryProcess:
    """A registry of the test's own, for tests that corrupt its storage."""
    reg = start_registry(tmp_path / "registry")
    yield reg
    reg.stop()


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    """A fresh lazyoci data root, also exported as LAZYOCI_ROOT for CLI subprocesses."""
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("LAZYOCI_ROOT", str(root))
    return root
