"""Rules of the test suite itself: a test module holds tests, and `needs_root` skips with its reason."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def test_every_test_module_holds_tests():
    """Helpers shared by tests live in tests/helpers/, not in a test_*.py pytest collects."""
    empty = []
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")
                   for n in ast.walk(tree)):
            empty.append(path.name)
    assert empty == []


SAMPLE = '''
import os
import pytest

@pytest.mark.needs_root("overlay mounts")
def test_marked():
    assert os.geteuid() == 0

def test_unmarked():
    assert os.geteuid() != 0
'''


@pytest.mark.needs_root("setpriv to run pytest as nobody")
def test_needs_root_skips_with_its_reason_for_another_user():
    python = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin")
    if python is None:
        pytest.skip("no system Python of this version for user nobody")
    work = Path(tempfile.mkdtemp(prefix="needs-root-"))
    try:
        shutil.copy(TESTS / "conftest.py", work / "conftest.py")
        shutil.copytree(TESTS / "helpers", work / "helpers")
        (work / "test_sample.py").write_text(SAMPLE)
        subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-m", "pytest",
             "-p", "no:cacheprovider", "-rs", "-q", "--rootdir", str(work), str(work)],
            capture_output=True, text=True, cwd=work, timeout=120,
            env={"PYTHONPATH": sysconfig.get_paths()["purelib"], "HOME": str(work), "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1 passed, 1 skipped" in r.stdout
        assert "needs root: overlay mounts" in r.stdout
    finally:
        shutil.rmtree(work)


LEAKY = '''
import subprocess
import sys


def test_leaves_a_mount_and_a_process(tmp_path):
    (tmp_path / "m").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "leak", str(tmp_path / "m")], check=True)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(tmp_path / "m")],
                     start_new_session=True)
'''


@pytest.mark.needs_root("a tmpfs mount")
def test_a_test_that_leaves_a_mount_or_a_process_fails_and_they_are_cleared():
    from helpers.leaks import left_behind

    work = Path(tempfile.mkdtemp(prefix="leaky-"))
    try:
        shutil.copy(TESTS / "conftest.py", work / "conftest.py")
        shutil.copytree(TESTS / "helpers", work / "helpers")
        (work / "test_leaky.py").write_text(LEAKY)
        r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(work),
                            "--basetemp", str(work / "tmp"), str(work / "test_leaky.py")],
                           capture_output=True, text=True, cwd=work, timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "1 passed, 1 error" in r.stdout, r.stdout
        assert "test_leaky.py::test_leaves_a_mount_and_a_process left behind: tmpfs mount " in r.stdout, r.stdout
        assert "import time; time.sleep(600)" in r.stdout, r.stdout
        assert left_behind(work) == []
    finally:
        shutil.rmtree(work)
