"""`lazyoci pull` with the service running: the service pulls, the CLI shows what it would have
shown pulling itself (rows, INFO lines, digest, one-line errors and exit codes), with the CLI's
own credentials, registry settings and Ctrl-C; without a service the CLI pulls itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import push_soci_index, write_config
from helpers.registry import start_registry
from helpers.store_check import assert_store_consistent
from helpers.tricky_image import push_tricky_image

pytestmark = pytest.mark.needs_root("the service mounts FUSE; pulls unpack layers owned by root")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def lz(root: Path, *args: str, env: dict | None = None, check: bool = True, input: str | None = None,
       umask: int | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([LAZYOCI, "--root", str(root), *args], capture_output=True, text=True, input=input,
                       env={**os.environ, **(env or {})}, timeout=120,
                       preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    if check:
        assert p.returncode == 0, f"lazyoci {' '.join(args)} failed: {p.stderr}"
    return p


def pulls_served(root: Path) -> list[str]:
    """The references the service pulled for a CLI, from its log."""
    log = root / "service/lazyoci.log"
    text = log.read_text() if log.exists() else ""
    return re.findall(r"pull of (\S+) \(\w+\) for pid", text)


class Service:
    """The service of a data root, started with `env` (not the CLI's) and stopped at the end."""

    def __init__(self, root: Path, *args: str, env: dict | None = None, umask: int | None = None) -> None:
        self.root, self.args = root, args
        lz(root, *args, "service", "start", env=env, umask=umask)

    def stop(self) -> None:
        lz(self.root, *self.args, "service", "stop", check=False)


def shown(p: subprocess.CompletedProcess) -> tuple[int, list[str], str]:
    """What a pull showed, less what differs from run to run: the footer's time and rate, and the
    order in which layers finished."""
    lines = p.stdout.splitlines()
    rows = [l for l in lines if not l.startswith("elapsed: ")]
    footers = [re.sub(r"elapsed: \S+|\([^)]*/s\)", "", l) for l in lines if l.startswith("elapsed: ")]
    return p.returncode, sorted(rows) + footers, p.stderr


def modes(root: Path) -> dict[str, int]:
    """The mode of everything a pull wrote, by its path in the data root less the snapshot number."""
    return {re.sub(r"^snapshots/overlayfs/\d+/", "snapshots/overlayfs/N/", str(f.relative_to(root))):
            f.lstat().st_mode for sub in ("blobs", "snapshots/overlayfs") for f in (root / sub).rglob("*")}


def test_the_service_pulls_and_the_cli_shows_the_same(tmp_path, registry):
    """Rows, digest, records and the modes of what it wrote (the service was started under another umask)."""
    layers = [make_layer([Entry("big", data=os.urandom(700_000))]),
              make_layer([Entry("etc", "dir", mode=0o755), Entry("etc/x", data=b"x", mode=0o640)])]
    push_image(registry.host, "svcpull/app", layers, image_config(layers), tmp_path)
    ref = f"{registry.host}/svcpull/app:latest"
    alone, served = tmp_path / "alone", tmp_path / "served"
    service = Service(served, umask=0o077)
    try:
        by_cli, by_service = lz(alone, "pull", ref), lz(served, "pull", ref)
        assert pulls_served(served) == [ref] and not (alone / "service/lazyoci.log").exists()
        assert shown(by_service) == shown(by_cli)
        assert any(l.startswith(f"layer-{layers[0].digest}:") and " done " in l for l in by_service.stdout.splitlines())
        digest = lz(served, "pull", "-q", ref).stdout
        assert digest == lz(alone, "pull", "-q", ref).stdout and re.fullmatch(r"sha256:[0-9a-f]{64}\n", digest)
        assert lz(served, "images", "--format", "json").stdout == lz(alone, "images", "--format", "json").stdout
        assert len(pulls_served(served)) == 2
        assert modes(served) == modes(alone) and len(modes(alone)) > 5
    finally:
        service.stop()
    assert_store_consistent(served)


def test_errors_of_a_pull_in_the_service_are_the_cli_errors(tmp_path, registry):
    plain = make_layer([Entry("f", data=b"f")])
    push_image(registry.host, "svcpull/plain", [plain], image_config([plain]), tmp_path)
    alone, served = tmp_path / "alone", tmp_path / "served"
    config = write_config(tmp_path / "config.yaml")
    cases = [
        ("pull", f"{registry.host}/svcpull/nothere:latest"),                       # NotFoundError
        ("pull", "127.0.0.1:1/nobody/home:latest"),                                # RegistryError
        ("pull", "--all-platforms", "--snapshotter", "soci", f"{registry.host}/svcpull/plain:latest"),
        ("pull", "--snapshotter", "soci", "--soci-index-digest", "sha256:" + "0" * 64,
         f"{registry.host}/svcpull/plain:latest"),                                  # asked for: an error
        ("pull", "--snapshotter", "overlayfs", "--soci-index-digest", "sha256:" + "0" * 64,
         f"{registry.host}/svcpull/plain:latest"),
        ("pull", "--platform", "linux/s390x", f"{registry.host}/svcpull/plain:latest"),   # not this image's
        ("pull", "Bad/Ref:!"),                                                       # ReferenceError_
    ]
    service = Service(served, "--config", str(config))
    try:
        for args in cases:
            by_cli = lz(alone, "--config", str(config), *args, check=False)
            by_service = lz(served, "--config", str(config), *args, check=False)
            assert by_cli.returncode != 0 and len(by_cli.stderr.strip().splitlines()) == 1, by_cli.stderr
            assert shown(by_service) == shown(by_cli), args
        assert len(pulls_served(served)) == len(cases)
    finally:
        service.stop()


def test_a_lazy_pull_in_the_service_and_its_info_line(tmp_path, registry):
    push_tricky_image(registry.host, "svcpull/tricky", tmp_path)
    index = push_soci_index(registry.host, "svcpull/tricky", tmp_path)
    plain = make_layer([Entry("hello.txt", data=b"full pull\n")])
    push_image(registry.host, "svcpull/noindex", [plain], image_config([plain]), tmp_path)
    lazy, full = f"{registry.host}/svcpull/tricky:latest", f"{registry.host}/svcpull/noindex:latest"
    root = tmp_path / "root"
    config = write_config(tmp_path / "config.yaml")
    service = Service(root, "--config", str(config))
    try:
        r = lz(root, "--config", str(config), "pull", "--snapshotter", "soci", "--soci-index-digest", index, lazy)
        assert "manifest-sha256:" in r.stdout and "layer-sha256:" not in r.stdout and r.stderr == "", r
        assert lz(root, "--config", str(config), "service", "status").stdout.count("svcpull/tricky") == 3
        r = lz(root, "--config", str(config), "pull", "--snapshotter", "soci", full)
        assert f"layer-{plain.digest}" in r.stdout
        assert r.stderr == (f"INFO: no SOCI index was found for {full}: downloading every layer before the "
                            "container starts (no lazy loading)\n")
        assert pulls_served(root) == [lazy, full]
        snapshotters = {row["Repository"].rsplit("/", 1)[1]: row["Snapshotter"] for row in map(
            json.loads, lz(root, "--config", str(config), "images", "--format", "json").stdout.splitlines())}
        assert snapshotters == {"tricky": "soci", "noindex": "overlayfs"}
    finally:
        service.stop()
    assert_store_consistent(root)


def test_the_service_pulls_with_the_cli_credentials(tmp_path):
    """A registry that needs a login: the service asks the CLI, which reads its own docker config
    (here one the service's environment does not name); logged out, the same 401 as without a service."""
    htpasswd = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-Bbc", str(htpasswd), "alice", "s3cret"], check=True, capture_output=True)
    reg = start_registry(tmp_path / "authreg", htpasswd=htpasswd)
    served, alone = tmp_path / "served", tmp_path / "alone"
    cli_env = {"DOCKER_CONFIG": str(tmp_path / "docker")}
    service = Service(served, env={"DOCKER_CONFIG": str(tmp_path / "nobody")})
    try:
        rootfs = tmp_path / "rootfs"
        rootfs.mkdir()
        (rootfs / "f").write_text("x")
        ref = f"{reg.host}/private/app:1"
        lz(alone, "login", "-u", "alice", "--password-stdin", reg.host, input="s3cret\n", env=cli_env)
        lz(alone, "import", str(rootfs), ref, env=cli_env)
        lz(alone, "push", "-q", ref, env=cli_env)
        digest = lz(served, "pull", "-q", ref, env=cli_env).stdout
        assert digest.startswith("sha256:") and pulls_served(served) == [ref]
        assert not (tmp_path / "nobody").exists()
        lz(alone, "logout", reg.host, env=cli_env)
        lz(served, "rmi", ref)
        by_service = lz(served, "pull", ref, env=cli_env, check=False)
        by_cli = lz(alone, "pull", ref, env=cli_env, check=False)
        assert by_cli.returncode != 0 and "401" in by_cli.stderr and shown(by_service) == shown(by_cli)
        (tmp_path / "docker/config.json").write_text("{not json")         # the CLI's config error, as its own
        by_service = lz(served, "pull", ref, env=cli_env, check=False)
        by_cli = lz(alone, "pull", ref, env=cli_env, check=False)
        assert "invalid JSON" in by_cli.stderr and shown(by_service) == shown(by_cli)
        assert len(pulls_served(served)) == 3
    finally:
        service.stop()
        reg.stop()


def test_a_cli_whose_proxy_settings_differ_pulls_itself(tmp_path, registry):
    layer = make_layer([Entry("f", data=b"proxied?")])
    push_image(registry.host, "svcpull/proxy", [layer], image_config([layer]), tmp_path)
    ref = f"{registry.host}/svcpull/proxy:latest"
    root = tmp_path / "root"
    service = Service(root)
    try:
        lz(root, "pull", "-q", ref, env={"no_proxy": "*"})       # the service would not see it
        assert pulls_served(root) == []
        lz(root, "pull", "-q", ref)
        assert pulls_served(root) == [ref]
    finally:
        service.stop()


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_an_interrupted_pull_in_the_service_leaves_nothing_half_written(tmp_path, registry, how):
    """Ctrl-C in the CLI cancels the service's pull, which rolls back before the CLI exits; a CLI
    killed outright closes its connection, which cancels the pull too."""
    from helpers.fault_proxy import FaultProxy
    from helpers.interrupt import interrupt_pull
    layers = [make_layer([Entry("big", data=os.urandom(1_000_000))])]
    push_image(registry.host, f"svcpull/interrupt-{how}", layers, image_config(layers), tmp_path)
    root = tmp_path / "root"
    blob = root / "blobs/sha256" / layers[0].digest.split(":")[1]
    service = Service(root)
    try:
        with FaultProxy(registry.host) as proxy:
            ref = f"{proxy.host}/svcpull/interrupt-{how}:latest"
            p, out, err = interrupt_pull(root, ref, proxy, layers[0].digest, how)
            if how == "sigint":
                assert p.returncode == 130 and err.strip() == "lazyoci: interrupted", err
                assert list((root / "tmp").iterdir()) == []      # rolled back before the CLI exited
            else:                 # the service notices the closed connection, rolls back, then logs it
                deadline = time.monotonic() + 30
                while "cancelled" not in (root / "service/lazyoci.log").read_text():
                    assert time.monotonic() < deadline, list((root / "tmp").iterdir())
                    time.sleep(0.05)
                assert list((root / "tmp").iterdir()) == []
            assert not blob.exists() and pulls_served(root) == [ref]
            assert "cancelled" in (root / "service/lazyoci.log").read_text()
            proxy.clear()
            lz(root, "pull", "-q", ref)
        assert blob.read_bytes() == layers[0].blob and pulls_served(root) == [ref, ref]
    finally:
        service.stop()
    assert_store_consistent(root)


@pytest.mark.parametrize("command", ["stop", "restart"])
def test_a_service_stop_cancels_its_pull_and_a_restart_goes_on_with_it(tmp_path, registry, command):
    """`service stop` during a pull the service runs: the pull rolls back, its CLI says why in one
    line. `service restart`: the old process hands over at once and the pull dies with it, so the
    CLI asks the new process for the same pull, which goes on from what is stored (the CLI failed
    with "lost the lazyoci service during the pull")."""
    from helpers.fault_proxy import FaultProxy
    from helpers.interrupt import start_dripping_pull
    layers = [make_layer([Entry("big", data=os.urandom(1_000_000))])]
    push_image(registry.host, f"svcpull/{command}", layers, image_config(layers), tmp_path)
    root = tmp_path / "root"
    service = Service(root)
    try:
        with FaultProxy(registry.host) as proxy:
            ref = f"{proxy.host}/svcpull/{command}:latest"
            p = start_dripping_pull(root, ref, proxy, layers[0].digest, ctrl_c=False)
            assert {"stop": "stopped", "restart": "running"}[command] in lz(root, "service", command).stdout
            out, err = p.communicate(timeout=30 if command == "stop" else 60)
            if command == "stop":
                assert p.returncode == 1 and len(err.strip().splitlines()) == 1, err
                assert err.startswith("lazyoci: error: ") and "cancelled" in err and "Traceback" not in err
                assert list((root / "tmp").iterdir()) == [] and pulls_served(root) == [ref]
            else:
                assert p.returncode == 0 and err == "", err
                assert pulls_served(root) == [ref, ref]
                assert ref.rsplit(":", 1)[0] in lz(root, "images").stdout
                blob = root / "blobs/sha256" / layers[0].digest.split(":")[1]
                assert blob.read_bytes() == layers[0].blob
    finally:
        service.stop()
    assert_store_consistent(root)


def test_the_cli_imports_no_registry_client_when_the_service_pulls(tmp_path, registry):
    layer = make_layer([Entry("f", data=b"light")])
    push_image(registry.host, "svcpull/light", [layer], image_config([layer]), tmp_path)
    ref = f"{registry.host}/svcpull/light:latest"
    root = tmp_path / "root"
    service = Service(root)
    try:
        p = subprocess.run([sys.executable, "-X", "importtime", LAZYOCI, "--root", str(root), "pull", ref],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        imported = {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
        heavy = {"httpx", "httpcore", "ssl", "sqlite3", "lazyoci.images.service", "lazyoci.registry.client",
                 "lazyoci.snapshot.soci_pull", "lazyoci.images.pull"}
        assert "lazyoci.service.pull_requests" in imported and not imported & heavy, sorted(imported & heavy)
        assert pulls_served(root) == [ref]
    finally:
        service.stop()


def test_the_service_pulls_with_the_cli_insecure_registries(tmp_path, registry):
    """--insecure-registry reaches the service's registry client (a name that is not loopback
    needs it for plain HTTP; 0.0.0.0 reaches the loopback listener); without it, the CLI's error."""
    layer = make_layer([Entry("f", data=b"plain http")])
    push_image(registry.host, "svcpull/insecure", [layer], image_config([layer]), tmp_path)
    host = f"0.0.0.0:{registry.host.rsplit(':', 1)[1]}"
    ref = f"{host}/svcpull/insecure:latest"
    served, alone = tmp_path / "served", tmp_path / "alone"
    service = Service(served)
    try:
        by_service, by_cli = lz(served, "pull", ref, check=False), lz(alone, "pull", ref, check=False)
        assert by_cli.returncode != 0 and shown(by_service) == shown(by_cli)
        assert lz(served, "--insecure-registry", host, "pull", "-q", ref).stdout.startswith("sha256:")
        assert pulls_served(served) == [ref, ref]
    finally:
        service.stop()


@pytest.mark.parametrize("who", ["cli", "service"])
def test_a_pull_whose_output_is_closed_stops_and_rolls_back(tmp_path, registry, who):
    """Rows to a closed pipe: the pull stops and leaves nothing, whoever pulls (exit 1 and nothing
    said: click's own handling of a closed stdout)."""
    from helpers.fault_proxy import Fault, FaultProxy
    layers = [make_layer([Entry("big", data=os.urandom(1_000_000))])]
    push_image(registry.host, f"svcpull/epipe-{who}", layers, image_config(layers), tmp_path)
    root = tmp_path / "root"
    service = Service(root) if who == "service" else None
    try:
        with FaultProxy(registry.host) as proxy:
            ref = f"{proxy.host}/svcpull/epipe-{who}:latest"
            proxy.add(Fault("drip", rate=200_000, match=f"/blobs/{layers[0].digest}", method="GET"))
            p = subprocess.Popen([LAZYOCI, "--root", str(root), "pull", ref],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            p.stdout.close()                        # nobody reads the rows
            err = p.stderr.read()
            assert p.wait(30) == 1 and err == "", err
            assert list((root / "tmp").iterdir()) == [] and lz(root, "images", "-q").stdout == ""
            assert pulls_served(root) == ([ref] if who == "service" else [])
    finally:
        if service is not None:
            service.stop()
    assert_store_consistent(root)
