"""Commands on existing containers: inspect, start, restart, kill, wait, top, cp."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from lazyoci.cli.context import app
from lazyoci.cli.shared import image_service
from lazyoci.errors import ConfigError, ContainerError, LazyociError
from lazyoci.store.layout import DataRoot

if TYPE_CHECKING:
    from lazyoci.runtime.run import ContainerManager


def _manager() -> ContainerManager:
    from lazyoci.runtime.run import ContainerManager

    ctx = app()
    return ContainerManager(DataRoot(ctx.root), ctx.config, image_service(ctx))


def _each(names: tuple[str, ...], action: Callable[[str], object], show_result: bool = False) -> None:
    """Run `action` on every name and print the name (or what it returned), as docker does:
    an error is reported and the others go on."""
    failed = 0
    for name in names:
        try:
            result = action(name)
            click.echo(result if show_result else name)
        except LazyociError as e:
            if len(names) == 1:
                raise
            click.echo(f"lazyoci: error: {e}", err=True)
            failed += 1
    if failed:
        sys.exit(1)


def _container_json(mgr: ContainerManager, name: str) -> dict:
    from lazyoci.runtime.inspect import image_facts, inspect_container

    rec = mgr.store.get(name)
    entrypoint, stop_signal = image_facts(mgr.images, rec)
    return inspect_container(mgr.store, rec.id, entrypoint, stop_signal)


def _print_objects(objects: list[dict], fmt: str | None) -> None:
    """The JSON array docker prints, or one line per object with `--format`."""
    if fmt is None:
        click.echo(json.dumps(objects, indent=4))
        return
    from lazyoci.cli.gotemplate import Template

    template = Template.parse(fmt)
    for obj in objects:
        click.echo(template.render(obj))


_FORMAT_HELP = "A Go template of the fields, e.g. '{{.State.Status}}' or '{{json .Config}}'."


@click.command("inspect")
@click.option("-f", "--format", "fmt", default=None, help=_FORMAT_HELP)
@click.argument("containers", nargs=-1, required=True)
def container_inspect_cmd(fmt: str | None, containers: tuple[str, ...]) -> None:
    """Show containers as JSON, in docker's shape (State, Config, Mounts, GraphDriver, LogPath)."""
    mgr = _manager()
    _print_objects([_container_json(mgr, c) for c in containers], fmt)


@click.command("inspect")
@click.option("-f", "--format", "fmt", default=None, help=_FORMAT_HELP)
@click.argument("names", nargs=-1, required=True)
def inspect_cmd(fmt: str | None, names: tuple[str, ...]) -> None:
    """Show containers or images as JSON (a container first, as docker looks)."""
    mgr = _manager()
    out = []
    for name in names:
        try:
            out.append(_container_json(mgr, name))
            continue
        except ContainerError:
            pass
        try:
            out.append(mgr.images.inspect(name))
        except LazyociError:
            raise ContainerError(f"no such object: {name}") from None
    _print_objects(out, fmt)


@click.command("start")
@click.option("-a", "--attach", is_flag=True, help="Print the container's output until it exits; exit with its code.")
@click.argument("containers", nargs=-1, required=True)
def start_cmd(attach: bool, containers: tuple[str, ...]) -> None:
    """Start stopped containers in the background."""
    from lazyoci.runtime.lifecycle import start, wait

    mgr = _manager()
    if not attach:
        _each(containers, lambda c: start(mgr, c))
        return
    if len(containers) > 1:
        raise ConfigError("start -a attaches to one container, not several")
    begun = time.time_ns()          # this run's output: what the log gets from now on
    rec = start(mgr, containers[0])
    mgr.logs(rec.id, sys.stdout.buffer, follow=True, since_ns=begun)
    sys.stdout.flush()
    sys.exit(wait(mgr, rec.id))


@click.command("restart")
@click.option("-t", "--time", "timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait after the stop signal before killing.")
@click.argument("containers", nargs=-1, required=True)
def restart_cmd(timeout: float, containers: tuple[str, ...]) -> None:
    """Stop containers if they run, then start them in the background."""
    from lazyoci.runtime.lifecycle import restart

    mgr = _manager()
    _each(containers, lambda c: restart(mgr, c, timeout))


@click.command("kill")
@click.option("-s", "--signal", "signal_name", default="KILL", show_default=True,
              help="Signal to send: a name (KILL, SIGHUP) or a number.")
@click.argument("containers", nargs=-1, required=True)
def kill_cmd(signal_name: str, containers: tuple[str, ...]) -> None:
    """Send a signal to running containers (default SIGKILL)."""
    from lazyoci.runtime.lifecycle import kill, parse_signal

    parse_signal(signal_name)           # a bad signal is one error before any container
    mgr = _manager()
    _each(containers, lambda c: kill(mgr, c, signal_name))


@click.command("wait")
@click.argument("containers", nargs=-1, required=True)
def wait_cmd(containers: tuple[str, ...]) -> None:
    """Block until containers stop, then print their exit codes."""
    from lazyoci.runtime.lifecycle import wait

    mgr = _manager()
    _each(containers, lambda c: wait(mgr, c), show_result=True)


@click.command("top", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
@click.argument("container")
@click.argument("ps_args", nargs=-1, type=click.UNPROCESSED)
def top_cmd(container: str, ps_args: tuple[str, ...]) -> None:
    """Show the processes of a running container ([ps OPTIONS], default -ef)."""
    from lazyoci.runtime.lifecycle import top

    table = top(_manager(), container, ps_args)
    rows = [table.titles, *table.rows]
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(len(table.titles))]
    for r in rows:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r[:-1], widths)).rstrip() +
                   ("   " if len(r) > 1 else "") + r[-1])


def _split_copy_arg(arg: str) -> tuple[str | None, str]:
    """docker's rule: CONTAINER:PATH when a colon comes before any slash; a host path otherwise."""
    if arg.startswith(("/", ".")):
        return None, arg
    container, sep, path = arg.partition(":")
    if not sep or "/" in container:
        return None, arg
    if not container:
        raise ConfigError(f"no container name before ':' in {arg!r}")
    return container, path or "/"


@click.command("cp")
@click.argument("src")
@click.argument("dest")
def cp_cmd(src: str, dest: str) -> None:
    """Copy files between a container and the host: CONTAINER:SRC DEST or SRC CONTAINER:DEST."""
    from lazyoci.runtime.copy import copy_in, copy_out
    from lazyoci.runtime.lifecycle import container_rootfs

    src_container, src_path = _split_copy_arg(src)
    dest_container, dest_path = _split_copy_arg(dest)
    if (src_container is None) == (dest_container is None):
        raise ConfigError("cp copies between a container and the host: one of SRC and DEST must be "
                          "CONTAINER:PATH, not both")
    mgr = _manager()
    if src_container is not None:
        with container_rootfs(mgr, src_container) as rootfs:
            copy_out(rootfs, src_path, Path(dest_path).absolute())
    elif dest_container is not None:
        with container_rootfs(mgr, dest_container) as rootfs:
            copy_in(rootfs, Path(src_path).absolute(), dest_path)
