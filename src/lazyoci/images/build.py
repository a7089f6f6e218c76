"""build: an image from a Dockerfile, built by buildah and stored as an OCI image in lazyoci's store.

buildah does the building; lazyoci gives it what it knows about registries (credentials,
mirrors, insecure and loopback registries, docker's short names) so that `FROM` resolves as
`lazyoci pull` would, then takes the result as an OCI archive into the store. buildah keeps
its own storage under the data root (`build/`): the base images and step layers it caches
between builds, which `system prune` removes. A failed build stores nothing in lazyoci.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from lazyoci.errors import BuildError, ConfigError
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference, is_loopback_registry
from lazyoci.registry.credentials import default_config_path
from lazyoci.registry.options import RegistryOptions
from lazyoci.store.modes import private_dir

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService, LocalImage
    from lazyoci.store.layout import DataRoot

LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
_BUILD_ARG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(=.*)?$", re.S)


@dataclass(frozen=True)
class BuildOptions:
    """What `lazyoci build` was asked for (docker's flags)."""

    context: Path
    tags: tuple[str, ...] = ()
    dockerfile: Path | None = None        # default: Dockerfile (or Containerfile) in the context
    build_args: tuple[str, ...] = ()      # "KEY=VALUE", or "KEY" to take it from the environment
    target: str | None = None
    platform: Platform | None = None
    no_cache: bool = False


def build_dir(root: DataRoot) -> Path:
    """buildah's storage and settings for this data root (kept apart from lazyoci's own store)."""
    return root.path / "build"


@dataclass(frozen=True)
class RegistriesConf:
    """The registries.conf given to buildah, and the mirrors it cannot express."""

    text: str
    unusable_mirrors: tuple[str, ...]    # mirror URLs with a path before /v2 (containerd's style)


_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io")


def registries_conf(options: RegistryOptions) -> RegistriesConf:
    """A containers-registries.conf(5) saying what lazyoci's registry client does.

    Short names resolve on docker.io, as docker's normalisation does; loopback registries and
    `insecure_registries` may use plain HTTP or an unverified certificate; mirrors are tried
    before their registry. A mirror URL with a path is the API root in lazyoci (containerd's
    hosts.toml), a repository namespace in buildah: such a mirror is left out, not misread.
    """
    mirrors: dict[str, list[str]] = {}
    for registry, urls in options.mirrors.items():
        mirrors.setdefault("docker.io" if registry in _HUB_KEYS else registry, []).extend(urls)
    insecure = {*LOOPBACK_HOSTS, *options.insecure_registries}
    lines = ['unqualified-search-registries = ["docker.io"]', 'short-name-mode = "permissive"', ""]
    unusable: list[str] = []
    for host in sorted(insecure | set(mirrors)):
        lines += ["[[registry]]", f"prefix = {_toml(host)}", f"location = {_toml(host)}"]
        if host in insecure:
            lines.append("insecure = true")
        for url in mirrors.get(host, ()):
            parts = urlsplit(url)
            if parts.path.rstrip("/").removesuffix("/v2") or parts.scheme not in ("http", "https"):
                unusable.append(url)
                continue
            lines += ["[[registry.mirror]]", f"location = {_toml(parts.netloc)}"]
            if (parts.scheme == "http" or parts.netloc in options.insecure_registries
                    or is_loopback_registry(parts.netloc)):
                lines.append("insecure = true")
        lines.append("")
    return RegistriesConf("\n".join(lines), tuple(unusable))


def _toml(text: str) -> str:
    if any(c in text for c in '"\\\n'):
        raise ConfigError(f"registry name {text!r} cannot be given to buildah")
    return f'"{text}"'


def _dockerfile(options: BuildOptions) -> Path:
    if options.dockerfile is not None:
        if not options.dockerfile.is_file():
            raise ConfigError(f"Dockerfile {options.dockerfile} does not exist")
        return options.dockerfile
    for name in ("Dockerfile", "Containerfile"):
        if (options.context / name).is_file():
            return options.context / name
    raise ConfigError(f"no Dockerfile in {options.context} (use -f to name one)")


def _check(options: BuildOptions) -> list[str]:
    """The tags as full references; every flag checked before buildah starts."""
    if not options.context.is_dir():
        raise ConfigError(f"build context {options.context} is not a directory")
    for arg in options.build_args:
        if not _BUILD_ARG_RE.match(arg):
            raise ConfigError(f"--build-arg {arg!r} is not KEY=VALUE")
    if options.target is not None and not options.target.strip():
        raise ConfigError("--target needs a stage name")
    return [str(Reference.parse(t)) for t in options.tags]


def buildah_command(root: DataRoot, *args: str) -> list[str]:
    """buildah with this data root's storage (vfs: no mount is left behind, any filesystem works)."""
    buildah = shutil.which("buildah")
    if buildah is None:
        raise BuildError("buildah is not installed (Debian package `buildah`; `make deps` installs it)")
    base = build_dir(root)
    return [buildah, "--root", str(base / "storage"), "--runroot", str(base / "run"),
            "--storage-driver", "vfs", *args]


def _run(cmd: list[str], env: dict[str, str], log: Callable[[str], None]) -> None:
    """Run buildah, passing each line of its output to `log`; its last error line if it fails."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True, errors="replace", bufsize=1)
    last_error = ""
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            log(line)
            if line.startswith("Error: ") or line.startswith("error "):
                last_error = line
    if proc.returncode != 0:
        message = last_error.removeprefix("Error: ") or f"buildah exited with status {proc.returncode}"
        raise BuildError(f"build failed: {message}")


def build_image(svc: ImageService, options: BuildOptions,
                log: Callable[[str], None] = lambda _line: None) -> LocalImage:
    """Build `options.context` with buildah, store the image, name it with every tag; return it.

    buildah's output goes line by line to `log` (its steps, the pulls of FROM images).
    """
    from lazyoci.images.archive import load_archive

    names = _check(options)
    dockerfile = _dockerfile(options)
    base = private_dir(build_dir(svc.root))
    authfile = svc.registry_options.docker_config or default_config_path()
    with tempfile.TemporaryDirectory(dir=base, prefix=f"out-{os.getpid()}-") as out:
        # Each build has its own registries.conf: two builds may run with different flags.
        conf, iidfile, archive = Path(out) / "registries.conf", Path(out) / "iid", Path(out) / "image.tar"
        registries = registries_conf(svc.registry_options)
        conf.write_text(registries.text)
        for url in registries.unusable_mirrors:
            log(f"lazyoci: buildah cannot use registry mirror {url} (a path before /v2): not used by this build")
        env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}
        cmd = ["build", "--layers", "--force-rm", "--isolation", "oci", "--network", "host",
               "--format", "oci", "--iidfile", str(iidfile), "-f", str(dockerfile)]
        if authfile.is_file():
            cmd += ["--authfile", str(authfile)]
        for arg in options.build_args:
            cmd += ["--build-arg", arg]
        if options.target:
            cmd += ["--target", options.target]
        if options.platform:
            cmd += ["--platform", str(options.platform)]
        if options.no_cache:
            cmd.append("--no-cache")
        _run(buildah_command(svc.root, *cmd, str(options.context)), env, log)
        image_id = iidfile.read_text().strip()
        _run(buildah_command(svc.root, "push", "--quiet", "--format", "oci", "--compression-format", "gzip",
                             image_id, f"oci-archive:{archive}"), env, log)
        top = load_archive(svc, archive)[0]
    for name in names:
        svc.tag(top, name)
    image = svc.get(names[0] if names else top, options.platform)
    _record_layer_sizes(svc, image)
    return image


def _record_layer_sizes(svc: ImageService, image: LocalImage) -> None:
    """The unpacked size of each new layer, for SIZE in `images` (a pull counts it as it downloads)."""
    from lazyoci.images.layersize import uncompressed_size
    from lazyoci.oci import mediatypes as mt

    known = svc.records.layer_sizes(l.digest for l in image.manifest.layers)
    for layer in image.manifest.layers:
        if layer.digest in known:
            continue
        with svc.blobs.open(layer.digest) as f:
            size = uncompressed_size(f, mt.layer_compression(layer.media_type))
        if size is not None:
            svc.record_layer_size(layer.digest, size)


def prune_build_cache(root: DataRoot) -> None:
    """Remove every image and working container buildah keeps for this data root, and what
    builds that were killed left (their `out-<pid>-*` directories)."""
    base = build_dir(root)
    for leftover in base.glob("out-*-*"):
        pid = leftover.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(leftover, ignore_errors=True)
    if not (base / "storage").exists():
        return
    for args in (("rm", "--all"), ("rmi", "--all", "--force")):
        r = subprocess.run(buildah_command(root, *args), stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, errors="replace")
        if r.returncode != 0 and "no such image" not in r.stderr.lower():
            raise BuildError(f"buildah {args[0]} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
