"""CLI start-up: each command imports only what it needs, and CLI modules do not import each other.

The real `lazyoci` executable runs under `python -X importtime`, which names every module a
process imports; no timing is asserted.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

import lazyoci.cli

from helpers.images import Entry, image_config, make_layer, push_image

LAZYOCI = str(Path(sys.executable).parent / "lazyoci")

# What a command that reads local records never needs: the registry client, the config
# parser (without a config file), the FUSE service's libraries, the zTOC codec.
HEAVY = ("httpx", "httpcore", "yaml", "pyfuse3", "trio", "flatbuffers", "zlib_ng")

COMMAND_MODULES = ("lazyoci.cli.images", "lazyoci.cli.containers", "lazyoci.cli.soci", "lazyoci.cli.service",
                   "lazyoci.cli.lifecycle")

EVERY_COMMAND = {"pull", "push", "tag", "images", "image", "rmi", "save", "load", "import", "login", "logout",
                 "run", "ps", "logs", "stop", "rm", "soci", "service", "vm"}


def without_config(home: Path) -> dict[str, str]:
    """The environment with no config file: no LAZYOCI_CONFIG, and a HOME without ~/.lazyoci."""
    env = {k: v for k, v in os.environ.items() if k != "LAZYOCI_CONFIG"}
    env["HOME"] = str(home)
    return env


def imported_modules(root: Path, *args: str, config: Path | None = None) -> tuple[set[str], str]:
    """The modules `lazyoci ARGS` imports (by default without a config file), and its stdout."""
    env = {**without_config(root.parent), "LAZYOCI_ROOT": str(root)}
    if config is not None:
        env["LAZYOCI_CONFIG"] = str(config)
    p = subprocess.run([sys.executable, "-X", "importtime", LAZYOCI, *args], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    modules = {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    return modules, p.stdout


def heavy_in(modules: set[str]) -> set[str]:
    """The heavy top-level packages among `modules`."""
    return {m.split(".")[0] for m in modules} & set(HEAVY)


@pytest.fixture
def root_with_image(registry, tmp_path) -> Path:
    """A data root holding one pulled image, so `images` has a row to read."""
    layers = [make_layer([Entry("hello", data=b"hello\n")])]
    repo = f"startup/app{tmp_path.name[-8:].replace('_', '')}"
    push_image(registry.host, repo, layers, image_config(layers, cmd=["/hello"]), tmp_path)
    root = tmp_path / "root"
    env = without_config(tmp_path)
    p = subprocess.run([LAZYOCI, "--root", str(root), "pull", "-q", f"{registry.host}/{repo}:latest"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    return root


@pytest.mark.needs_root("the pull unpacks layers owned by root")
@pytest.mark.parametrize("args", [["--version"], ["ps", "-a"], ["images"], ["image", "ls"]])
def test_local_commands_import_no_heavy_library(root_with_image, args):
    modules, out = imported_modules(root_with_image, *args)
    assert "lazyoci.cli.main" in modules                  # the importtime parse saw the CLI
    assert out                                            # and the command printed its answer
    assert heavy_in(modules) == set(), f"lazyoci {' '.join(args)} imported {sorted(heavy_in(modules))}"


@pytest.mark.needs_root("the pull unpacks layers owned by root")
def test_ps_loads_neither_openssl_nor_the_image_model(root_with_image):
    """`ps` (and its `ancestor=` filter) reads container records: no hashing, no manifests."""
    modules, out = imported_modules(root_with_image, "ps", "-a", "--filter", "ancestor=busybox")
    assert out.startswith("CONTAINER ID")
    assert "lazyoci.oci.reference" in modules             # the filter's parse was loaded
    loaded = modules & {"_hashlib", "hashlib", "lazyoci.oci.manifest", "lazyoci.store.blobs"}
    assert loaded == set(), sorted(loaded)


def test_help_lists_every_command_without_importing_them(tmp_path):
    modules, out = imported_modules(tmp_path, "--help")
    listed = out.split("Commands:\n", 1)[1].split()
    assert EVERY_COMMAND <= set(listed)
    assert "Download an image from a registry." in out
    assert not modules & set(COMMAND_MODULES), sorted(modules & set(COMMAND_MODULES))
    assert heavy_in(modules) == set()

    modules, out = imported_modules(tmp_path, "image", "--help")
    for name in ("ls", "inspect", "rm", "prune", "mount", "unmount"):
        assert f"\n  {name} " in out, out
    assert not modules & set(COMMAND_MODULES)


def test_the_table_matches_the_commands():
    """The short help `--help` shows without importing a command is the command's own."""
    from lazyoci.cli.commands import COMMANDS, CONTAINER_COMMANDS, IMAGE_COMMANDS

    for table in (COMMANDS, IMAGE_COMMANDS, CONTAINER_COMMANDS):
        for name, entry in table.items():
            cmd = entry.load()
            assert isinstance(cmd, click.Command) and cmd.name == name
            assert cmd.get_short_help_str(1000) == entry.short_help_str(1000)
    modules = {entry.target.partition(":")[0] for t in (COMMANDS, IMAGE_COMMANDS) for entry in t.values()}
    assert set(COMMAND_MODULES) <= modules


def _cli_imports(path: Path) -> set[str]:
    """Every `lazyoci.cli.X` module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "lazyoci.cli":
                found.update(f"lazyoci.cli.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("lazyoci.cli.")}


def test_cli_modules_do_not_import_each_other():
    cli_dir = Path(lazyoci.cli.__file__).parent
    for path in sorted(cli_dir.glob("*.py")):
        name = f"lazyoci.cli.{path.stem}"
        others = _cli_imports(path) & (set(COMMAND_MODULES) - {name})
        assert not others, f"{name} imports the command modules {sorted(others)}"
        if name in COMMAND_MODULES:
            assert "lazyoci.cli.main" not in _cli_imports(path), f"{name} imports lazyoci.cli.main"


def test_yaml_is_loaded_only_for_a_config_file_not_parsed_before(tmp_path):
    """Without a config file PyYAML stays out; with one, errors still name the file and line; a
    command whose config has the text the last one parsed takes its kept document, without PyYAML."""
    modules, _ = imported_modules(tmp_path, "ps")
    assert "yaml" not in modules

    config = tmp_path / "config.yaml"
    config.write_text("snapshotters:\n  - soci\n  - bogus\n")
    p = subprocess.run([LAZYOCI, "--root", str(tmp_path / "root"), "--config", str(config), "ps"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"lazyoci: error: {config}:3: unknown snapshotter 'bogus' (supported: overlayfs, soci, stargz)"

    config.write_text("snapshotters:\n  - soci\n")
    modules, out = imported_modules(tmp_path, "ps", config=config)
    assert "yaml" in modules and out.startswith("CONTAINER ID")
    modules, out = imported_modules(tmp_path, "ps", config=config)
    assert "yaml" not in modules and out.startswith("CONTAINER ID")
    config.write_text("snapshotters:\n  - overlayfs\n")
    modules, out = imported_modules(tmp_path, "ps", config=config)
    assert "yaml" in modules and out.startswith("CONTAINER ID")


@pytest.mark.needs_root("run mounts an overlay and starts runc")
def test_run_of_a_pulled_image_does_not_load_the_registry_client(registry, tmp_path):
    """`run` of an image already pulled asks no registry: its start never imports httpx."""
    from helpers.tricky_image import push_tricky_image

    push_tricky_image(registry.host, "startup/run", tmp_path / "image")
    root = tmp_path / "root"
    ref = f"{registry.host}/startup/run:latest"
    p = subprocess.run([LAZYOCI, "--root", str(root), "pull", "-q", ref], capture_output=True, text=True,
                       env=without_config(tmp_path), timeout=120)
    assert p.returncode == 0, p.stderr
    modules, out = imported_modules(root, "run", "--rm", ref, "/bin/echo", "ran")
    assert out == "ran\n"
    assert {"httpx", "httpcore"} & heavy_in(modules) == set(), sorted(heavy_in(modules))


def test_the_service_client_does_not_load_the_session_holder():
    """The CLI reaches the service (pull, run of a lazy image) through its client, which reaches
    the FUSE session holder through holder_link: the holder's own module is the service's."""
    code = "import sys, lazyoci.service.client; print('lazyoci.service.session_holder' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert p.stdout == "False\n"


def _entry(tmp_path: Path, before: str, *args: str) -> subprocess.CompletedProcess:
    """The console script's `entry` in a fresh interpreter, after the Python code `before`."""
    code = (f"import sys\n{before}\nsys.argv = ['lazyoci', *{list(args)!r}]\n"
            "from lazyoci.cli.main import entry\nentry()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**without_config(tmp_path), "LAZYOCI_ROOT": str(tmp_path / "root")})


def test_the_console_script_ends_with_atexit_callbacks_and_its_output_flushed(tmp_path):
    """The quick end (no interpreter teardown) still runs atexit callbacks and flushes stdout."""
    marker = tmp_path / "atexit-ran"
    p = _entry(tmp_path, f"import atexit, pathlib\natexit.register(pathlib.Path({str(marker)!r}).touch)\n"
                         "sys.stdout.write('unflushed ')", "--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("unflushed lazyoci, version ")
    assert marker.exists()
    p = _entry(tmp_path, "", "rmi", "no-such-image")
    assert p.returncode == 1 and p.stderr == "lazyoci: error: no such image: no-such-image\n"


def test_the_console_script_waits_for_a_thread_that_still_runs(tmp_path):
    """A thread that is not a daemon and still works when the command ends is waited for."""
    marker = tmp_path / "thread-done"
    p = _entry(tmp_path, f"import threading, time, pathlib\nthreading.Thread(target=lambda: (time.sleep(0.3), "
                         f"pathlib.Path({str(marker)!r}).touch())).start()", "--version")
    assert p.returncode == 0, p.stderr
    assert marker.exists()


def test_output_to_a_full_device_is_one_error_line_not_a_traceback(tmp_path):
    """stdout on a full disk (here /dev/full): the command fails with one line on stderr."""
    with open("/dev/full", "w") as full:
        p = subprocess.run([LAZYOCI, "--version"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                           env={**without_config(tmp_path), "LAZYOCI_ROOT": str(tmp_path / "root")})
    assert p.returncode == 1
    assert p.stderr == "lazyoci: error: No space left on device\n"


def test_run_loads_neither_the_socket_module_nor_the_unpacker():
    """`run` of a pulled image stacks unpacked layers and writes a bundle: the unpacker (and its
    tar reader) is loaded only to unpack, and the host's name comes from uname."""
    code = ("import sys, lazyoci.runtime.run, lazyoci.runtime.bundle, lazyoci.snapshot.overlay; "
            "print(sorted(m for m in ('socket', 'lazyoci.snapshot.unpack', 'lazyoci.tar.headers') "
            "if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
