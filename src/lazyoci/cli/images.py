"""Image commands: pull, push, tag, images / image ls, image inspect, rmi, save, load, import, login, logout."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from lazyoci.cli.context import app
from lazyoci.cli.durations import human_duration
from lazyoci.cli.progress import ProgressDisplay, human_bytes
from lazyoci.cli.shared import (image_service, info_line, lazy_label, prefetch_files, prefetch_flags,
                                registry_options, soci_push_after_image)
from lazyoci.config import SNAPSHOTTERS
from lazyoci.errors import ConfigError, LazyociError
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService


def _platform(text: str | None) -> Platform | None:
    return Platform.parse(text) if text else None


def _pull_in_service(ref: str, platform: str | None, snapshotter: str, display: ProgressDisplay | None,
                     all_platforms: bool, index_digest: str | None) -> str | None:
    """Have the running service pull (its digest), as nerdctl asks containerd; None when no service
    runs for this data root (or it leaves the pull to the CLI): then the CLI pulls itself.

    The service has the registry client and the pull code loaded: the CLI imports neither. Its rows
    and INFO lines come back over the control socket and are drawn here as the CLI's own are."""
    from lazyoci.service.pull_requests import PullRequest, registry_environment, request_pull
    from lazyoci.store.layout import DataRoot

    ctx = app()
    if ctx.debug:
        return None          # --debug: the pull's own logs and tracebacks, in this process
    request = PullRequest(ref=ref, snapshotter=snapshotter, platform=platform, all_platforms=all_platforms,
                          index_digest=index_digest, progress=display is not None,
                          insecure_registries=ctx.insecure_registries,
                          mirrors=dict(ctx.config.registry_mirrors), environment=registry_environment())
    return request_pull(DataRoot(ctx.root), request, display, info_line)


@click.command("pull")
@click.option("--platform", help="os/arch[/variant] (default: this host).")
@click.option("--all-platforms", is_flag=True, help="Pull every platform of a multi-platform image.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image digest.")
@click.option("--snapshotter", type=click.Choice(SNAPSHOTTERS), default=None,
              help="How layers are prepared (default: the config's first snapshotter).")
@click.option("--soci-index-digest", default=None, help="Use this SOCI index instead of discovering one.")
@click.argument("ref")
def pull_cmd(platform: str | None, all_platforms: bool, quiet: bool, snapshotter: str | None,
             soci_index_digest: str | None, ref: str) -> None:
    """Download an image from a registry."""
    ctx = app()
    wanted = _platform(platform)
    name = snapshotter or ctx.config.default_snapshotter
    display = None if quiet else ProgressDisplay(sys.stdout)
    with display or contextlib.nullcontext():
        digest = _pull_in_service(ref, platform, name, display, all_platforms, soci_index_digest)
        if digest is None:
            from lazyoci.snapshot.snapshotters import pull_image

            svc = image_service(ctx)
            try:
                digest = pull_image(svc, ref, wanted, name, ctx.config, display, all_platforms=all_platforms,
                                    index_digest=soci_index_digest, log=info_line).digest
            finally:
                svc.close()
    if quiet:
        click.echo(digest)


@click.command("push")
@click.option("--platform", help="Push only this platform's manifest.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the pushed digest.")
@click.option("--snapshotter", type=click.Choice(SNAPSHOTTERS), default=None,
              help="soci: also build (or reuse) the image's SOCI index and push it.")
@click.option("--soci-span-size", type=int, default=None, help="With --snapshotter soci: span size.")
@click.option("--soci-min-layer-size", type=int, default=None,
              help="With --snapshotter soci: layers smaller than this get no zTOC.")
@prefetch_flags
@click.argument("ref")
def push_cmd(platform: str | None, quiet: bool, snapshotter: str | None, soci_span_size: int | None,
             soci_min_layer_size: int | None, prefetch_file: tuple[str, ...], prefetch_files_json: Path | None,
             ref: str) -> None:
    """Upload a local image to the registry its name points at."""
    prefetch = prefetch_files(prefetch_file, prefetch_files_json)
    if prefetch and snapshotter != "soci":
        raise ConfigError("--prefetch-file goes with --snapshotter soci")
    svc = image_service()
    try:
        if quiet:
            digest = svc.push(ref, _platform(platform))
        else:
            with ProgressDisplay(sys.stdout) as display:
                digest = svc.push(ref, _platform(platform), display)
    finally:
        svc.close()
    if snapshotter == "soci":
        soci_push_after_image(ref, soci_span_size, soci_min_layer_size, _platform(platform), prefetch=prefetch)
    click.echo(digest)


@click.command("tag")
@click.argument("src")
@click.argument("dst")
def tag_cmd(src: str, dst: str) -> None:
    """Give a local image another name."""
    image_service().tag(src, dst)


def _created(text: str | None) -> str:
    if not text:
        return "N/A"
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    return human_duration((_dt.datetime.now(_dt.timezone.utc) - when).total_seconds()) + " ago"


def _matches(row, wanted: str | None) -> bool:
    """`images ubuntu` / `images ubuntu:22.04`: docker's REPOSITORY[:TAG] filter."""
    if not wanted or row.name is None:
        return not wanted
    ref = Reference.parse(row.name)
    name, _, tag = wanted.rpartition(":") if ":" in wanted.rsplit("/", 1)[-1] else (wanted, "", "")
    full = Reference.parse(name + ":x")
    return full.name == ref.name and (not tag or tag == ref.tag)


def _list(quiet: bool, digests: bool, fmt: str | None, wanted: str | None = None,
          filters: tuple[str, ...] = ()) -> None:
    svc = image_service()
    rows = [r for r in svc.list() if _matches(r, wanted)]
    if filters:
        from lazyoci.images.filters import filter_images
        rows = filter_images(svc, rows, filters)
    if quiet:
        seen: list[str] = []
        for r in rows:
            short = r.digest.split(":", 1)[1][:12]
            if short not in seen:
                seen.append(short)
                click.echo(short)
        return
    if fmt is not None:
        if fmt != "json":
            raise click.BadParameter("only 'json' is supported", param_hint="--format")
        for r in rows:
            click.echo(json.dumps({
                "Repository": r.repository, "Tag": r.tag, "ID": r.digest.split(":", 1)[1][:12],
                "Digest": r.digest, "CreatedAt": r.created, "Platform": r.platform,
                "Size": r.size, "BlobSize": r.blob_size, "Snapshotter": r.snapshotter, "Name": r.name,
            }))
        return
    header = ["REPOSITORY", "TAG"] + (["DIGEST"] if digests else []) + \
        ["IMAGE ID", "CREATED", "PLATFORM", "SIZE", "BLOB SIZE", "SNAPSHOTTER"]
    table = [header]
    for r in rows:
        table.append([r.repository, r.tag] + ([r.digest] if digests else []) +
                     [r.digest.split(":", 1)[1][:12], _created(r.created), r.platform,
                      human_bytes(r.size), human_bytes(r.blob_size),
                      lazy_label(r.snapshotter, r.name) if r.snapshotter == "soci" else r.snapshotter])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("    ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


_list_options = [
    click.option("-q", "--quiet", is_flag=True, help="Only image IDs."),
    click.option("--digests", is_flag=True, help="Show digests."),
    click.option("--format", "fmt", help="'json': one JSON object per line."),
    click.option("-f", "--filter", "filters", multiple=True,
                 help="dangling=true|false, label=KEY[=VALUE], before=IMAGE, since=IMAGE, reference=PATTERN."),
]


def _with_list_options(f):
    for opt in reversed(_list_options):
        f = opt(f)
    return f


@click.command("images")
@_with_list_options
@click.argument("repository", required=False)
def images_cmd(quiet: bool, digests: bool, fmt: str | None, filters: tuple[str, ...],
               repository: str | None) -> None:
    """List local images (optionally only REPOSITORY[:TAG])."""
    _list(quiet, digests, fmt, repository, filters)


@click.command("ls")
@_with_list_options
@click.argument("repository", required=False)
def image_ls(quiet: bool, digests: bool, fmt: str | None, filters: tuple[str, ...],
             repository: str | None) -> None:
    """List local images (optionally only REPOSITORY[:TAG])."""
    _list(quiet, digests, fmt, repository, filters)


@click.command("inspect")
@click.argument("refs", nargs=-1, required=True)
def image_inspect(refs: tuple[str, ...]) -> None:
    """Show the stored index/manifest/config of images as JSON."""
    svc = image_service()
    click.echo(json.dumps([svc.inspect(r) for r in refs], indent=2))


def _remove(refs: tuple[str, ...], force: bool) -> None:
    ctx = app()
    svc = image_service(ctx)
    failed = 0
    for ref in refs:
        try:
            result = svc.remove(ref, force)
        except LazyociError as e:
            if len(refs) == 1:
                raise
            click.echo(f"lazyoci: error: {e}", err=True)   # like docker: go on with the others
            failed += 1
            continue
        for name in result.untagged:
            click.echo(f"Untagged: {Reference.parse(name).familiar()}")
        for digest in result.deleted:
            click.echo(f"Deleted: {digest}")
    _release_snapshots(svc)
    if failed:
        # (click.exceptions.Exit would be swallowed: main() runs click with standalone_mode=False)
        sys.exit(1)


def _release_snapshots(svc: ImageService) -> int:
    """Unpacked layers of images that are gone go too, so disk space really comes back
    (returns the blob bytes that frees)."""
    from lazyoci.images.system import release_snapshots

    return release_snapshots(svc, app().config)


@click.command("rmi")
@click.option("-f", "--force", is_flag=True, help="Remove even if several names or containers use it.")
@click.argument("refs", nargs=-1, required=True)
def rmi_cmd(force: bool, refs: tuple[str, ...]) -> None:
    """Remove local images; blobs nothing else uses are deleted."""
    _remove(refs, force)


@click.command("rm")
@click.option("-f", "--force", is_flag=True)
@click.argument("refs", nargs=-1, required=True)
def image_rm(force: bool, refs: tuple[str, ...]) -> None:
    """Remove local images (= rmi)."""
    _remove(refs, force)


@click.command("prune")
def image_prune() -> None:
    """Remove unnamed images and every blob nothing references."""
    svc = image_service()
    for digest in svc.prune_unnamed():
        click.echo(f"Deleted: {digest}")
    freed = svc.gc().bytes_freed + _release_snapshots(svc)
    click.echo(f"Total reclaimed space: {human_bytes(freed)}")


@click.command("save")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Archive to write (default: stdout, which must not be a terminal).")
@click.option("--platform", help="Save only this platform.")
@click.argument("refs", nargs=-1, required=True)
def save_cmd(output: Path | None, platform: str | None, refs: tuple[str, ...]) -> None:
    """Write images to an OCI archive (with docker's manifest.json, so docker/podman/skopeo load it)."""
    if output is None or str(output) == "-":
        if sys.stdout.isatty():
            raise click.UsageError("refusing to write an archive to a terminal: use -o FILE or a pipe")
        image_service().save(sys.stdout.buffer, list(refs), _platform(platform))
        sys.stdout.buffer.flush()
        return
    image_service().save(output, list(refs), _platform(platform))


@click.command("load")
@click.option("-i", "--input", "input_", type=click.Path(path_type=Path), default=None,
              help="OCI archive or docker-archive tarball (default: stdin).")
@click.option("-q", "--quiet", is_flag=True)
def load_cmd(input_: Path | None, quiet: bool) -> None:
    """Load images from an OCI archive or a docker-archive tarball."""
    source = sys.stdin.buffer if input_ is None or str(input_) == "-" else input_
    image_service().load(source, None if quiet else click.echo)


@click.command("import")
@click.option("-c", "--change", "changes", multiple=True,
              help="Dockerfile instruction: CMD, ENTRYPOINT, ENV, WORKDIR, USER, LABEL, EXPOSE, VOLUME, STOPSIGNAL.")
@click.option("--platform", help="os/arch[/variant] of the image (default: this host).")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("ref")
def import_cmd(changes: tuple[str, ...], platform: str | None, source: Path, ref: str) -> None:
    """Create an image from a root filesystem tarball or directory."""
    image = image_service().import_rootfs(source, ref, changes, _platform(platform))
    click.echo(image.digest)


def _registry_client():
    """The registry client of this invocation (login and logout need no image store)."""
    from lazyoci.registry import RegistryClient

    return RegistryClient(registry_options(app()))


@click.command("login")
@click.option("-u", "--username")
@click.option("-p", "--password", help="Prefer --password-stdin.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.argument("registry", required=False, default="docker.io")
def login_cmd(username: str | None, password: str | None, password_stdin: bool, registry: str) -> None:
    """Log in to a registry (credentials go to the docker config)."""
    if password_stdin:
        if password:
            raise click.UsageError("--password and --password-stdin are exclusive")
        password = sys.stdin.read().rstrip("\r\n")
    if not username:
        username = click.prompt("Username")
    if not password:
        password = click.prompt("Password", hide_input=True)
    client = _registry_client()
    try:
        client.login(registry, username, password)
    finally:
        client.close()
    click.echo("Login Succeeded")


@click.command("logout")
@click.argument("registry", required=False, default="docker.io")
def logout_cmd(registry: str) -> None:
    """Forget the stored credentials of a registry."""
    client = _registry_client()
    try:
        client.logout(registry)
    finally:
        client.close()
    click.echo(f"Removing login credentials for {registry}")
