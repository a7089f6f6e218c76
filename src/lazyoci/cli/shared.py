"""What more than one command module needs, so that command modules never import each other.

The library is imported inside the functions: this module is loaded by commands that
may not need the registry client at all.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from lazyoci.cli.context import AppContext, app

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService
    from lazyoci.oci.platform import Platform
    from lazyoci.registry.options import RegistryOptions
    from lazyoci.soci.build import SociBuildOptions

_START = time.monotonic()


def registry_options(ctx: AppContext) -> RegistryOptions:
    """The registry settings of this invocation: --insecure-registry flags and the config file."""
    from lazyoci.registry.options import RegistryOptions

    return RegistryOptions(insecure_registries=ctx.insecure_registries,
                           mirrors=dict(ctx.config.registry_mirrors))


def image_service(ctx: AppContext | None = None) -> ImageService:
    """The image service over this invocation's data root (its registry client is made on first use)."""
    from lazyoci.images.service import ImageService
    from lazyoci.store.layout import DataRoot

    ctx = ctx or app()
    return ImageService(DataRoot(ctx.root), registry_options(ctx))


def soci_build_options(span_size: int | None, min_layer_size: int | None, force: bool = False,
                       version: str = "v1", prefetch_files: tuple[str, ...] = ()) -> SociBuildOptions:
    """SOCI build options from flags; a flag not given keeps the library's default."""
    from lazyoci.soci.build import DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE, SociBuildOptions

    return SociBuildOptions(span_size=DEFAULT_SPAN_SIZE if span_size is None else span_size,
                            min_layer_size=DEFAULT_MIN_LAYER_SIZE if min_layer_size is None else min_layer_size,
                            force=force, version=version, prefetch_files=prefetch_files)


def prefetch_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """The reference's `--prefetch-file` (repeatable) and `--prefetch-files-json` flags."""
    command = click.option("--prefetch-files-json", type=click.Path(path_type=Path, dir_okay=False), default=None,
                           help="A JSON array of paths to prefetch at mount.")(command)
    return click.option("--prefetch-file", multiple=True, metavar="PATH",
                        help="A file to prefetch at mount: its spans go in the index's prefetch "
                             "artifact (repeatable).")(command)


def prefetch_files(files: tuple[str, ...], json_file: Path | None) -> tuple[str, ...]:
    """The paths of the prefetch flags (soci/prefetch.py reads the JSON file)."""
    from lazyoci.soci.prefetch import load_prefetch_files
    return load_prefetch_files(files, json_file)


def info_line(line: str) -> None:
    """A line the library reports for the user (a lazy pull that falls back says why): on stderr."""
    click.echo(line, err=True)


def logrus_info(line: str) -> None:
    """One logrus-style INFO line, as nerdctl prints what the soci tool says (on stderr, where
    logrus writes, so that stdout keeps only the push rows and the digest)."""
    click.echo(f"INFO[{int(time.monotonic() - _START):04d}] soci: {line}", err=True)


def soci_push_after_image(ref: str, span_size: int | None = None, min_layer_size: int | None = None,
                          platform: Platform | None = None, existing: str = "warn",
                          prefetch: tuple[str, ...] = ()) -> str:
    """Build (or reuse) the v1 SOCI index of local image `ref` and push it next to the image
    (soci/publish.py, through soci/image_service_wiring.py).

    Called by `lazyoci push --snapshotter soci` once the image itself is pushed; the SOCI lines
    are printed the way nerdctl/Finch relay them: `INFO[SSSS] soci: <line>` (logrus, seconds
    since the command started). Returns the index digest.
    """
    from lazyoci.soci.image_service_wiring import build_and_push_local_image_index

    images = image_service()
    try:
        return build_and_push_local_image_index(
            images, ref, soci_build_options(span_size, min_layer_size, prefetch_files=prefetch),
            platform, logrus_info, existing)
    finally:
        images.close()


def lazy_label(snapshotter: str, image: str | None) -> str:
    """A lazy image's or container's snapshotter with the formats its lazy layers are served
    through when any is not a zTOC: "soci (estargz)", "soci (ztoc, estargz)"; plain otherwise."""
    from lazyoci.oci.reference import Reference
    from lazyoci.store.db import Database
    from lazyoci.store.lazy_layer_records import LazyLayerRecords
    from lazyoci.store.layout import DataRoot

    if not image:
        return snapshotter
    try:
        formats = LazyLayerRecords(Database(DataRoot(app().root).db_path)).image_formats(str(Reference.parse(image)))
    except Exception:       # a display detail: never fail `images` or `ps` over it
        return snapshotter
    if formats <= {"ztoc"}:
        return snapshotter
    return f"{snapshotter} ({', '.join(sorted(formats, key=lambda f: f != 'ztoc'))})"
