"""`lazyoci build` with the real buildah and the local registry: the image lands in the store and
runs, save and push take it; FROM through lazyoci's mirrors, short names and credentials; a
failing Dockerfile is one error line and stores nothing; `build --soci` makes it lazy-loadable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image, write_oci_layout
from helpers.lazy import write_config
from helpers.registry import start_registry

pytestmark = [pytest.mark.needs_root("buildah, overlay and runc"),
              pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah is not installed")]
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")
APPLETS = ("sh", "echo", "cat", "ls", "mkdir", "false", "true", "wc", "head")


def _lz(root: Path, *args: str, check: bool = True, config: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [LAZYOCI, "--root", str(root)] + (["--config", str(config)] if config else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"lazyoci {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


def _busybox_layer():
    bb = Path("/bin/busybox").read_bytes()
    return make_layer([Entry("bin", "dir"), Entry("bin/busybox", data=bb, mode=0o755), Entry("tmp", "dir")]
                      + [Entry(f"bin/{a}", "symlink", linkname="busybox") for a in APPLETS])


def _push_base(host: str, repo: str, work: Path) -> str:
    layer = _busybox_layer()
    push_image(host, repo, [layer], image_config([layer], cmd=["sh"], env=["PATH=/bin"]), work)
    return f"{host}/{repo}:latest"


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [l.split()[4] for l in f if l.split()[4].startswith(str(root))]


@pytest.fixture(scope="module")
def base(registry, tmp_path_factory) -> str:
    return _push_base(registry.host, "build/base", tmp_path_factory.mktemp("build-base"))


def _context(path: Path, dockerfile: str, files: dict[str, bytes] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "Dockerfile").write_text(dockerfile)
    for name, data in (files or {}).items():
        (path / name).write_bytes(data)
    return path


def test_build_stores_an_image_that_runs_saves_and_pushes(base, registry, data_root, tmp_path):
    ctx = _context(tmp_path / "ctx", (
        f"FROM {base} AS first\n"
        "ARG GREETING=hello\n"
        "RUN echo \"$GREETING from the first stage\" > /greeting\n"
        f"FROM {base} AS final\n"
        "COPY --from=first /greeting /greeting\n"
        "COPY note.txt /app/note.txt\n"
        "RUN cat /app/note.txt >> /greeting\n"
        'CMD ["cat", "/greeting"]\n'
        "FROM final AS never\n"
        "RUN false\n"), {"note.txt": b"copied from the context\n"})
    other = tmp_path / "Other.dockerfile"
    other.write_text(f"FROM {base}\nRUN echo other > /other\nCMD [\"cat\", \"/other\"]\n")
    ref = f"{registry.host}/build/app:1"
    r = _lz(data_root, "build", "-t", ref, "-t", "build/app:also", "--build-arg", "GREETING=hi",
            "--target", "final", str(ctx))
    assert "STEP" in r.stderr and "COPY note.txt" in r.stderr, r.stderr      # buildah's steps, on stderr
    assert (data_root / "build").stat().st_mode & 0o777 == 0o700      # buildah's storage: root's alone
    digest = r.stdout.strip()
    assert digest.startswith("sha256:") and len(r.stdout.splitlines()) == 1, r.stdout
    images = _lz(data_root, "images").stdout
    assert "build/app" in images and "also" in images and digest[7:19] in images, images
    row = json.loads(_lz(data_root, "images", "--format", "json", "build/app:also").stdout)
    assert row["Size"] > row["BlobSize"], row        # SIZE is unpacked: busybox compresses well
    out = _lz(data_root, "run", "--rm", ref).stdout
    assert out == "hi from the first stage\ncopied from the context\n", out
    assert _lz(data_root, "run", "--rm", "build/app:also").stdout == out

    r = _lz(data_root, "build", "-q", "-f", str(other), "-t", "build/other", str(ctx))
    assert r.stderr == "" and r.stdout.startswith("sha256:"), (r.stdout, r.stderr)
    assert _lz(data_root, "run", "--rm", "build/other").stdout == "other\n"

    archive = tmp_path / "app.tar"
    _lz(data_root, "save", "-o", str(archive), ref)
    with tarfile.open(archive) as tf:
        assert "index.json" in tf.getnames()
    _lz(data_root, "push", ref)
    fresh = tmp_path / "fresh-root"
    assert _lz(fresh, "run", "--rm", ref).stdout == out           # pulled back from the registry
    for root in (data_root, fresh):
        for c in _lz(root, "ps", "-a", "-q").stdout.split():
            _lz(root, "rm", "-f", c)
        assert _mounts_under(root) == []


def test_a_failing_dockerfile_is_one_error_line_and_stores_nothing(base, data_root, tmp_path):
    cases = {
        "fails": (f"FROM {base}\nRUN echo about to fail && false\n", 'RUN echo about to fail && false'),
        "missing-base": (f"{base.rsplit('/', 1)[0]}/no-such-image:latest", "no-such-image"),
        "no-from": ("RUN true\n", "no FROM"),
    }
    for name, (dockerfile, words) in cases.items():
        if not dockerfile.startswith(("FROM", "RUN")):
            dockerfile = f"FROM {dockerfile}\n"
        ctx = _context(tmp_path / name, dockerfile)
        r = _lz(data_root, "build", "-t", f"build/{name}", str(ctx), check=False)
        errors = [l for l in r.stderr.splitlines() if l.startswith("lazyoci: error:")]
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert len(errors) == 1 and words in errors[0] and r.stderr.rstrip().endswith(errors[0]), r.stderr
        assert r.stdout == ""
    ctx = tmp_path / "fails"
    bad_flags = [
        (["build", str(tmp_path / "no-such-dir")], "is not a directory"),
        (["build", "-f", str(tmp_path / "nope"), str(ctx)], "does not exist"),
        (["build", str(tmp_path)], "no Dockerfile"),
        (["build", "--build-arg", "=x", str(ctx)], "--build-arg"),
        (["build", "-t", "Bad:Name:x", str(ctx)], "Bad:Name:x"),
        (["build", "--platform", "linux", str(ctx)], "invalid platform"),
        (["build", "--soci", str(ctx)], "--soci"),
        (["build", "--soci-min-layer-size", "0", "-t", "build/x", str(ctx)], "go with --soci"),
    ]
    for args, words in bad_flags:
        r = _lz(data_root, *args, check=False)
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert _lz(data_root, "images", "-q").stdout == ""
    assert list((data_root / "blobs" / "sha256").iterdir()) == []
    assert _mounts_under(data_root) == []


def test_from_a_short_name_through_the_configured_mirror(registry, data_root, tmp_path):
    """`FROM lzbuild-mirrored` is docker.io/library/lzbuild-mirrored, as docker reads it; lazyoci's
    registry_mirrors for docker.io serve it (the test has no route to Docker Hub)."""
    _push_base(registry.host, "library/lzbuild-mirrored", tmp_path)
    with_path = f"http://{registry.host}/api-root"     # lazyoci's (containerd's) meaning, not buildah's
    config = write_config(tmp_path / "config.yaml", extra=(
        f"registry_mirrors:\n  docker.io: [\"{with_path}\", \"http://{registry.host}\"]\n"))
    ctx = _context(tmp_path / "ctx", "FROM lzbuild-mirrored\nRUN echo mirrored > /m\nCMD [\"cat\", \"/m\"]\n")
    r = _lz(data_root, "build", "-t", "build/mirrored", str(ctx), config=config)
    assert "docker.io/library/lzbuild-mirrored" in r.stderr, r.stderr   # no such image on Docker Hub
    assert f"cannot use registry mirror {with_path}" in r.stderr, r.stderr
    assert _lz(data_root, "run", "--rm", "build/mirrored", config=config).stdout == "mirrored\n"


def test_from_a_registry_that_needs_the_login_of_lazyoci(data_root, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(subprocess.run(["htpasswd", "-Bbn", "alice", "s3cret"], check=True,
                                        capture_output=True).stdout)
    reg = start_registry(tmp_path / "authreg", htpasswd=htpasswd)
    try:
        env = {"DOCKER_CONFIG": str(tmp_path / "docker")}
        subprocess.run(["skopeo", "login", "--tls-verify=false", "-u", "alice", "-p", "s3cret",
                        "--authfile", str(tmp_path / "skopeo-auth.json"), reg.host], check=True, capture_output=True)
        layer = _busybox_layer()
        work = tmp_path / "layout"
        write_oci_layout(work, [layer], image_config([layer], cmd=["sh"], env=["PATH=/bin"]))
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", "--authfile", str(tmp_path / "skopeo-auth.json"),
                        f"oci:{work}:latest", f"docker://{reg.host}/private/base:latest"],
                       check=True, capture_output=True)
        ctx = _context(tmp_path / "ctx", f"FROM {reg.host}/private/base:latest\nCMD [\"echo\", \"private\"]\n")
        r = _lz(data_root, "build", "-t", "build/private", str(ctx), check=False, env=env)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr    # not logged in yet
        subprocess.run([LAZYOCI, "--root", str(data_root), "login", "-u", "alice", "--password-stdin", reg.host],
                       input="s3cret\n", text=True, check=True, capture_output=True, env={**os.environ, **env})
        _lz(data_root, "build", "-t", "build/private", str(ctx), env=env)
        assert _lz(data_root, "run", "--rm", "build/private").stdout == "private\n"
    finally:
        reg.stop()


def test_build_soci_pushes_the_index_and_the_image_runs_lazily(base, registry, data_root, tmp_path):
    data = os.urandom(3 << 20)
    ctx = _context(tmp_path / "ctx", f"FROM {base}\nCOPY data.bin /data/data.bin\n"
                                     "CMD [\"sh\", \"-c\", \"head -c 5 /data/data.bin | wc -c\"]\n",
                   {"data.bin": data})
    ref = f"{registry.host}/build/lazy:1"
    config = write_config(tmp_path / "config.yaml")
    try:
        r = _lz(data_root, "build", "--soci", "--soci-min-layer-size", "0", "-t", ref, str(ctx), config=config)
        assert "soci:" in r.stderr and "INFO" in r.stderr, r.stderr
        _lz(data_root, "rmi", ref, config=config)
        r = _lz(data_root, "run", "--rm", "--snapshotter", "soci", ref, config=config)
        assert r.stdout.strip() == "5", (r.stdout, r.stderr)
        assert "no SOCI index" not in r.stderr, r.stderr
        assert "soci" in _lz(data_root, "images", config=config).stdout
        # the data layer was served lazily: its blob was never downloaded whole
        status = _lz(data_root, "service", "status", config=config).stdout
        assert "build/lazy" in status, status
    finally:
        for c in _lz(data_root, "ps", "-a", "-q", config=config, check=False).stdout.split():
            _lz(data_root, "rm", "-f", c, config=config, check=False)
        _lz(data_root, "service", "stop", config=config, check=False)
    assert _mounts_under(data_root) == []
