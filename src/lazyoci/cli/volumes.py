"""`volume create/ls/rm/inspect`: named volumes under the data root, with docker's output."""

from __future__ import annotations

import datetime
import json

import click

from lazyoci.cli.context import app
from lazyoci.errors import ConfigError
from lazyoci.runtime.volumes import Volume, VolumeStore
from lazyoci.store.layout import DataRoot


def _store() -> VolumeStore:
    return VolumeStore(DataRoot(app().root))


def _inspect(vol: Volume) -> dict:
    """docker's `volume inspect` shape (the local driver, no options)."""
    created = datetime.datetime.fromtimestamp(vol.created, datetime.timezone.utc).astimezone()
    return {"CreatedAt": created.isoformat(timespec="seconds"), "Driver": "local", "Labels": vol.labels,
            "Mountpoint": str(vol.mountpoint), "Name": vol.name, "Options": {}, "Scope": "local"}


@click.group("volume")
def volume_group() -> None:
    """Manage volumes."""


@volume_group.command("create")
@click.option("-l", "--label", "labels", multiple=True, help="Set a KEY=VALUE label on the volume.")
@click.argument("name", required=False)
def volume_create(labels: tuple[str, ...], name: str | None) -> None:
    """Create a volume (a random name if none is given) and print its name."""
    parsed = {}
    for item in labels:
        key, _, value = item.partition("=")
        if not key:
            raise ConfigError(f"invalid --label {item!r}: use KEY=VALUE")
        parsed[key] = value
    click.echo(_store().create(name, parsed).name)


@volume_group.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only volume names.")
def volume_ls(quiet: bool) -> None:
    """List volumes."""
    vols = _store().list()
    if quiet:
        for v in vols:
            click.echo(v.name)
        return
    click.echo(f"{'DRIVER':<10}VOLUME NAME")
    for v in vols:
        click.echo(f"{'local':<10}{v.name}")


@volume_group.command("inspect")
@click.argument("names", nargs=-1, required=True)
def volume_inspect(names: tuple[str, ...]) -> None:
    """Show volumes as JSON, as docker does."""
    store = _store()
    click.echo(json.dumps([_inspect(store.get(n)) for n in names], indent=4))


@volume_group.command("rm")
@click.option("-f", "--force", is_flag=True, help="Remove a volume even if a container uses it.")
@click.argument("names", nargs=-1, required=True)
def volume_rm(force: bool, names: tuple[str, ...]) -> None:
    """Remove volumes (refused while a container uses one, unless -f)."""
    store = _store()
    for n in names:
        store.remove(n, force)
        click.echo(n)


@volume_group.command("prune")
@click.option("-a", "--all", "include_named", is_flag=True, help="Also named volumes, not only anonymous ones.")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
def volume_prune(include_named: bool, force: bool) -> None:
    """Remove the volumes no container uses (anonymous ones; -a: named ones too)."""
    what = "all volumes" if include_named else "all anonymous volumes"
    if not force and not click.confirm(f"WARNING! This will remove {what} not used by at least one "
                                       "container.\nAre you sure you want to continue?"):
        return
    removed = _store().prune(include_named)
    if removed:
        click.echo("Deleted Volumes:")
        for name, _ in removed:
            click.echo(name)
        click.echo("")
    click.echo(f"Total reclaimed space: {_human_size(sum(size for _, size in removed))}")


def _human_size(n: float) -> str:
    """docker's sizes: powers of 1000, three significant digits (0B, 12.3kB, 1.05MB)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n}{unit}" if unit == "B" else f"{n:.3g}{unit}"
        n /= 1000
    return f"{n}B"
