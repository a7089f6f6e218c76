"""`lazyoci service start|stop|status` and the Finch-style aliases `lazyoci vm start|stop|status`."""

from __future__ import annotations

import click

from lazyoci.cli.context import app
from lazyoci.service.client import ServiceClient
from lazyoci.store.layout import DataRoot


def _client() -> ServiceClient:
    ctx = app()
    return ServiceClient(DataRoot(ctx.root), ctx.config.path)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _start() -> None:
    info = _client().start()
    click.echo(f"lazyoci service is running (pid {info['pid']}), lazy layers at {info['mountpoint']}")


def _stop(force: bool) -> None:
    client = _client()
    if client.stop(force=force):
        click.echo("lazyoci service stopped")
    else:
        _not_running(client)


def _not_running(client: ServiceClient) -> None:
    """Say the service is not running, and what a killed one left behind."""
    stale = client.stale_mount()
    if stale is None:
        click.echo("lazyoci service is not running")
        return
    click.echo(f"lazyoci service is not running, but a stale FUSE mount remains at {stale} (the service "
               f"was killed): run `lazyoci service start` to take it over, or `umount -l {stale}`")
    users = client.users()
    if users:
        click.echo(f"{len(users)} mount(s) still stack on its lost layers ({', '.join(users[:3])}"
                   f"{', ...' if len(users) > 3 else ''}): remove those containers and image mounts")


def _status() -> None:
    client = _client()
    if not client.is_running():
        _not_running(client)
        return
    st = client.status()
    click.echo(f"lazyoci service is running (pid {st['pid']}, RSS {_human(st['rss_bytes'])}), "
               f"lazy layers at {st['mountpoint']}")
    limit = _human(st["cache_max_bytes"]) if st["cache_max_bytes"] else "no limit"
    if st.get("containerd_socket"):
        click.echo(f"containerd snapshotter socket: {st['containerd_socket']}")
    click.echo(f"span cache: {_human(st['cache_bytes'])} ({limit}); "
               f"background fetch: {'on' if st['background_fetch'] else 'off'}")
    if not st["layers"]:
        click.echo("no lazy layers mounted")
        return
    click.echo(f"{'LAYER':<20}{'FORMAT':<13}{'FILES':>9}{'FETCHED':>12}{'TOTAL':>12}{'%':>7}{'NETWORK':>12}{'UNREAD':>12}{'PREFETCH':>11}  REF")
    for l in st["layers"]:
        click.echo(f"{l['layer_digest'][:19]:<20}{l.get('format', 'soci'):<13}{l['files']:>9}{_human(l['fetched_bytes']):>12}"
                   f"{_human(l['total_bytes']):>12}{l['percent']:>6.1f}%{_human(l['network_bytes']):>12}"
                   f"{_human(l['unread_bytes']):>12}{_prefetched(l):>11}  {l['ref']}")


def _prefetched(layer: dict) -> str:
    """Spans of the recorded prefetch fetched so far, of those it had to fetch ('-': none)."""
    return f"{layer['prefetch_done']}/{layer['prefetch_spans']}" if layer.get("prefetch_spans") else "-"


@click.group("service")
def service_group() -> None:
    """Manage the lazyoci service that serves lazily loaded layers (FUSE)."""


@click.group("vm")
def vm_group() -> None:
    """Alias of `service` for Finch users (there is no VM: the service plays its part)."""


_FORCE = click.option("--force", is_flag=True,
                      help="Stop even while containers or image mounts use lazy layers.")

for group in (service_group, vm_group):
    group.command("start", help="Start the service (a changed config file takes effect now).")(_start)
    group.command("stop", help="Unmount the lazy layers and stop the service.")(_FORCE(_stop))
    group.command("status", help="Show the service and its lazy layers (cached/total bytes; NETWORK: compressed "
                                         "bytes fetched since the service started, UNREAD: those of spans no read used).")(_status)
