"""`system df` and `system prune`: docker's disk usage table and clean-up."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from lazyoci.cli.context import app
from lazyoci.cli.progress import human_bytes
from lazyoci.cli.shared import image_service

if TYPE_CHECKING:
    from lazyoci.images.service import ImageService
    from lazyoci.runtime.run import ContainerManager


def _manager(svc: ImageService) -> ContainerManager:
    from lazyoci.runtime.run import ContainerManager
    from lazyoci.store.layout import DataRoot

    ctx = app()
    return ContainerManager(DataRoot(ctx.root), ctx.config, svc)


@click.group("system")
def system_group() -> None:
    """Disk usage and clean-up: system df, system prune."""


@system_group.command("df")
@click.option("--format", "fmt", default=None, help="'json': one JSON object per line.")
def df_cmd(fmt: str | None) -> None:
    """Show the space images, containers, the build cache and span caches take."""
    from lazyoci.images.system import disk_usage

    if fmt is not None and fmt != "json":
        raise click.BadParameter("only 'json' is supported", param_hint="--format")
    svc = image_service()
    rows = disk_usage(svc, _manager(svc), app().config)
    if fmt == "json":
        for r in rows:
            click.echo(json.dumps({"Type": r.kind, "TotalCount": r.total, "Active": r.active,
                                   "Size": r.size, "Reclaimable": r.reclaimable}))
        return
    table = [["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]]
    for r in rows:
        share = f" ({100 * r.reclaimable // r.size}%)" if r.size else ""
        table.append([r.kind, str(r.total), str(r.active), human_bytes(r.size), human_bytes(r.reclaimable) + share])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("    ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@system_group.command("prune")
@click.option("-a", "--all", "all_images", is_flag=True, help="Remove every image no container uses, not only unnamed ones.")
@click.option("--volumes", is_flag=True,
              help="Prune anonymous volumes no container uses too.")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
def prune_cmd(all_images: bool, volumes: bool, force: bool) -> None:
    """Remove stopped containers, unused images, the build cache and span caches no image uses."""
    from lazyoci.images.system import prune

    if not force:
        click.echo("WARNING! This will remove:\n  - all stopped containers\n"
                   + ("  - all images without at least one container associated to them\n" if all_images
                      else "  - all dangling images\n")
                   + ("  - all anonymous volumes not used by at least one container\n" if volumes else "")
                   + "  - all build cache\n  - span caches of lazy layers no image uses\n", err=True)
        try:
            if not click.confirm("Are you sure you want to continue?", default=False, err=True):
                return
        except click.exceptions.Abort:      # no answer (stdin closed): as docker, nothing is removed
            click.echo("", err=True)
            return
    svc = image_service()
    result = prune(svc, _manager(svc), app().config, all_images, volumes)
    _section("Deleted Containers:", result.containers)
    _section("Deleted Volumes:", result.volumes)
    _section("Deleted Images:", [f"untagged: {n}" for n in result.untagged] + [f"deleted: {d}" for d in result.images])
    _section("Deleted Span Caches:", result.span_caches)
    click.echo(f"Total reclaimed space: {human_bytes(result.bytes_freed)}")


def _section(title: str, lines) -> None:
    """One block of docker's prune report, left out when empty."""
    if lines:
        click.echo(title)
        for line in lines:
            click.echo(line)
        click.echo()
