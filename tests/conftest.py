"""Shared fixtures: real registries on loopback, temporary data roots."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.registry import RegistryProcess, start_registry


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
