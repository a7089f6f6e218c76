"""`lazyoci service start|stop|restart|status` and the Finch-style aliases `lazyoci vm ...`."""

from __future__ import annotations

import time

import click

from lazyoci.cli.context import app
from lazyoci.service.client import ServiceClient
from lazyoci.service.holder_link import holder_status, lost_note
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


def _stop(force: bool, hand_over: bool) -> None:
    client = _client()
    if client.stop(force=force, hand_over=hand_over):
        click.echo("lazyoci service stopped" + ("; its FUSE sessions wait for the next start" if hand_over else ""))
    else:
        _not_running(client)


def _restart() -> None:
    info = _client().restart()
    click.echo(f"lazyoci service is running (pid {info['pid']}), lazy layers at {info['mountpoint']}")


def _holder_line(client: ServiceClient) -> str | None:
    """What the FUSE session holder is doing, or what became of it."""
    held = holder_status(client.holder)
    if held is not None:
        return (f"FUSE sessions held by pid {held['pid']} (RSS {_human(held['rss_bytes'])}), "
                f"{held['waiting']} request(s) in flight")
    lost = lost_note(client.holder)
    if lost is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lost["time"]))
        return (f"the FUSE session holder (pid {lost['pid']}) died at {when}: lazy containers started "
                f"before then get I/O errors (remove them); the next run or `lazyoci service start` mounts afresh")
    return None


def _not_running(client: ServiceClient) -> None:
    """Say the service is not running, and what a killed one left behind."""
    held = holder_status(client.holder)
    if held is not None:
        click.echo(f"lazyoci service is not running; its FUSE sessions are held (pid {held['pid']}): lazy "
                   f"containers wait ({held['waiting']} request(s)) until `lazyoci service start` takes over")
        return
    note = _holder_line(client)
    stale = client.stale_mount()
    if stale is None:
        click.echo("lazyoci service is not running" + (f"; {note}" if note else ""))
        return
    if note is not None:
        click.echo(f"lazyoci service is not running; {note}")
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
    note = _holder_line(client)
    if note is not None:
        session = st.get("session", {})
        click.echo(note + (f"; taken over in {session.get('serving_after_seconds', 0):.3f}s with "
                           f"{session.get('handed_over', 0)} request(s) handed over" if session.get("resumed") else ""))
    if st.get("containerd_socket"):
        click.echo(f"containerd snapshotter socket: {st['containerd_socket']}")
    click.echo(f"span cache: {_human(st['cache_bytes'])} ({limit}); "
               f"background fetch: {'on' if st['background_fetch'] else 'off'}")
    if not st["layers"]:
        click.echo("no lazy layers mounted")
        return
    click.echo(f"{'LAYER':<20}{'FORMAT':<13}{'FILES':>9}{'FETCHED':>12}{'TOTAL':>12}{'%':>7}{'NETWORK':>12}{'UNREAD':>12}{'PREFETCH':>11}{'UNPACKED':>10}  REF")
    for l in st["layers"]:
        click.echo(f"{l['layer_digest'][:19]:<20}{l.get('format', 'soci'):<13}{l['files']:>9}{_human(l['fetched_bytes']):>12}"
                   f"{_human(l['total_bytes']):>12}{l['percent']:>6.1f}%{_human(l['network_bytes']):>12}"
                   f"{_human(l['unread_bytes']):>12}{_prefetched(l):>11}{l.get('unpack') or '-':>10}  {l['ref']}")


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
                      help="Stop even while containers or image mounts use lazy layers (they get errors).")
_HAND_OVER = click.option("--hand-over", is_flag=True,
                          help="Stop the service alone: lazy containers wait until the next start.")

for group in (service_group, vm_group):
    group.command("start", help="Start the service (a changed config file takes effect now).")(_start)
    group.command("stop", help="Unmount the lazy layers and stop the service.")(_FORCE(_HAND_OVER(_stop)))
    group.command("restart", help="Restart the service (new config and code) under running containers.")(_restart)
    group.command("status", help="Show the service and its lazy layers (cached/total bytes; NETWORK: compressed "
                                         "bytes fetched since the service started, UNREAD: those of spans no read used; UNPACKED: whether "
                                         "a complete layer is unpacked for new containers).")(_status)
