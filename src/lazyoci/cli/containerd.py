"""`lazyoci containerd pull`: an image into containerd, its indexed layers lazy (like `soci image rpull`)."""

from __future__ import annotations

import sys

import click

from lazyoci.cli.context import app
from lazyoci.cli.progress import ProgressDisplay
from lazyoci.cli.shared import registry_options


@click.group("containerd")
def containerd_group() -> None:
    """Use lazyoci with containerd: pull images into it with lazy layers.

    The lazyoci service is containerd's `soci` snapshotter (see `lazyoci service status`)."""


@containerd_group.command("pull")
@click.option("--address", default=None, help="containerd's socket (default: /run/containerd/containerd.sock).")
@click.option("-n", "--namespace", default=None, help="containerd namespace (default: default).")
@click.option("--snapshotter", default="soci", show_default=True,
              help="The snapshotter's name in containerd's config (a proxy plugin served by lazyoci).")
@click.option("--platform", help="os/arch[/variant] (default: this host).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image name.")
@click.argument("ref")
def containerd_pull(address: str | None, namespace: str | None, snapshotter: str, platform: str | None,
                    quiet: bool, ref: str) -> None:
    """Pull REF into containerd: layers with a zTOC in its SOCI index are served lazily by the
    lazyoci service, the rest are downloaded and unpacked by containerd.
    `ctr run --snapshotter soci REF` then starts it."""
    from lazyoci.containerd.client import DEFAULT_ADDRESS, DEFAULT_NAMESPACE, ContainerdClient
    from lazyoci.containerd.pull import pull_into_containerd
    from lazyoci.oci.platform import Platform
    from lazyoci.registry import RegistryClient

    registry = RegistryClient(registry_options(app()))
    containerd = ContainerdClient(address or DEFAULT_ADDRESS, namespace or DEFAULT_NAMESPACE)
    try:
        if quiet:
            result = pull_into_containerd(registry, containerd, ref, snapshotter,
                                          Platform.parse(platform) if platform else None)
        else:
            with ProgressDisplay(sys.stdout) as display:
                result = pull_into_containerd(registry, containerd, ref, snapshotter,
                                              Platform.parse(platform) if platform else None, display)
    finally:
        containerd.close()
        registry.close()
    if quiet:
        click.echo(result.name)
        return
    click.echo(f"{result.name}: {len(result.lazy)} layer(s) lazy, {len(result.downloaded)} downloaded, "
               f"{len(result.present)} already present ({snapshotter} snapshotter)")
