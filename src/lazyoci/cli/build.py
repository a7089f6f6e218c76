"""`build`: an image from a Dockerfile through buildah (steps on stderr, the image ID on stdout)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lazyoci.cli.shared import image_service, soci_push_after_image
from lazyoci.errors import ConfigError


@click.command("build")
@click.option("-t", "--tag", "tags", multiple=True, help="Name the image NAME[:TAG] (repeatable).")
@click.option("-f", "--file", "dockerfile", type=click.Path(path_type=Path), default=None,
              help="The Dockerfile (default: CONTEXT/Dockerfile).")
@click.option("--build-arg", "build_args", multiple=True, help="KEY=VALUE for an ARG (repeatable).")
@click.option("--target", default=None, help="Build this stage of a multi-stage Dockerfile.")
@click.option("--platform", default=None, help="os/arch[/variant] of the image (default: this host).")
@click.option("--no-cache", is_flag=True, help="Run every step again instead of reusing cached ones.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image ID.")
@click.option("--soci", is_flag=True, help="Then push the image with its SOCI index (= push --snapshotter soci).")
@click.option("--soci-span-size", type=int, default=None, help="With --soci: span size.")
@click.option("--soci-min-layer-size", type=int, default=None,
              help="With --soci: layers smaller than this get no zTOC.")
@click.argument("context", type=click.Path(path_type=Path))
def build_cmd(tags: tuple[str, ...], dockerfile: Path | None, build_args: tuple[str, ...], target: str | None,
              platform: str | None, no_cache: bool, quiet: bool, soci: bool, soci_span_size: int | None,
              soci_min_layer_size: int | None, context: Path) -> None:
    """Build an image from a Dockerfile (with buildah) into the local store."""
    from lazyoci.images.build import BuildOptions, build_image
    from lazyoci.oci.platform import Platform

    if not soci and (soci_span_size is not None or soci_min_layer_size is not None):
        raise ConfigError("--soci-span-size and --soci-min-layer-size go with --soci")
    if soci and not tags:
        raise ConfigError("--soci pushes the image: name it with -t REGISTRY/REPOSITORY[:TAG]")
    options = BuildOptions(context=context, tags=tags, dockerfile=dockerfile, build_args=build_args,
                           target=target, platform=Platform.parse(platform) if platform else None,
                           no_cache=no_cache)
    svc = image_service()
    try:
        image = build_image(svc, options, (lambda _line: None) if quiet else _to_stderr)
        if soci:
            for tag in tags:
                if quiet:
                    svc.push(tag, options.platform)
                else:
                    from lazyoci.cli.progress import ProgressDisplay
                    with ProgressDisplay(sys.stderr) as display:
                        svc.push(tag, options.platform, display)
                soci_push_after_image(tag, soci_span_size, soci_min_layer_size, options.platform)
    finally:
        svc.close()
    click.echo(image.digest)


def _to_stderr(line: str) -> None:
    click.echo(line, err=True)
