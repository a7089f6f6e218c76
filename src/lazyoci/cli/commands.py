"""Which commands exist, where each is defined, and the click group that imports them on first use.

A command module (and the library it drives: httpx, the image service, pyfuse3 ...) is
imported only when its command runs, so `lazyoci --version`, `ps` or `--help` start
without them. The one-line help of every command is kept here for the same reason:
`lazyoci --help` lists all commands without importing one.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass

import click


@dataclass(frozen=True)
class LazyCommand:
    """A command known by name before its module is imported."""

    target: str        # "module:attribute" of the click command or group
    short_help: str    # the first line of its help, shown by the group's --help

    def load(self) -> click.Command:
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def short_help_str(self, limit: int) -> str:
        """The short help shortened to `limit` characters, the way click shortens a command's help."""
        return click.Command(None, help=self.short_help).get_short_help_str(limit)


class LazyGroup(click.Group):
    """A click group whose commands are imported when they are run or asked for their own help."""

    def __init__(self, *args, lazy_commands: Mapping[str, LazyCommand] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            self.add_command(self.lazy_commands[cmd_name].load(), cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's command list, with the short help from the table for commands not yet imported."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            if name in self.commands:
                cmd = self.commands[name]
                if cmd.hidden:
                    continue
                rows.append((name, cmd.get_short_help_str(limit)))
            else:
                rows.append((name, self.lazy_commands[name].short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


_IMAGES = "lazyoci.cli.images"
_CONTAINERS = "lazyoci.cli.containers"
_SOCI = "lazyoci.cli.soci"
_SERVICE = "lazyoci.cli.service"
_BUILD = "lazyoci.cli.build"
_SYSTEM = "lazyoci.cli.system"
_LIFECYCLE = "lazyoci.cli.lifecycle"
_VOLUMES = "lazyoci.cli.volumes"

IMAGE_COMMANDS: dict[str, LazyCommand] = {
    "ls": LazyCommand(f"{_IMAGES}:image_ls", "List local images (optionally only REPOSITORY[:TAG])."),
    "inspect": LazyCommand(f"{_IMAGES}:image_inspect", "Show the stored index/manifest/config of images as JSON."),
    "rm": LazyCommand(f"{_IMAGES}:image_rm", "Remove local images (= rmi)."),
    "prune": LazyCommand(f"{_IMAGES}:image_prune", "Remove unnamed images and every blob nothing references."),
    "mount": LazyCommand(f"{_CONTAINERS}:image_mount_cmd",
                         "Mount an image's root filesystem read-only at DIRECTORY (pulling it if needed)."),
    "unmount": LazyCommand(f"{_CONTAINERS}:image_unmount_cmd", "Unmount what `image mount` mounted at DIRECTORY."),
}

# `image` gathers commands of two modules (images, containers), so it is defined here.
image_group = LazyGroup("image", help="Manage images.", lazy_commands=IMAGE_COMMANDS)

CONTAINER_COMMANDS: dict[str, LazyCommand] = {
    "inspect": LazyCommand(f"{_LIFECYCLE}:container_inspect_cmd",
                           "Show containers as JSON, in docker's shape (State, Config, Mounts, GraphDriver, "
                           "LogPath)."),
    "start": LazyCommand(f"{_LIFECYCLE}:start_cmd", "Start stopped containers in the background."),
    "restart": LazyCommand(f"{_LIFECYCLE}:restart_cmd", "Stop containers if they run, then start them in the "
                                                        "background."),
    "kill": LazyCommand(f"{_LIFECYCLE}:kill_cmd", "Send a signal to running containers (default SIGKILL)."),
    "wait": LazyCommand(f"{_LIFECYCLE}:wait_cmd", "Block until containers stop, then print their exit codes."),
    "top": LazyCommand(f"{_LIFECYCLE}:top_cmd", "Show the processes of a running container ([ps OPTIONS], "
                                                "default -ef)."),
    "cp": LazyCommand(f"{_LIFECYCLE}:cp_cmd", "Copy files between a container and the host: CONTAINER:SRC DEST "
                                              "or SRC CONTAINER:DEST."),
    "logs": LazyCommand(f"{_CONTAINERS}:logs_cmd", "Print the output of a detached container."),
    "stop": LazyCommand(f"{_CONTAINERS}:stop_cmd", "Stop running containers (the image's stop signal, then SIGKILL)."),
    "rm": LazyCommand(f"{_CONTAINERS}:rm_cmd", "Remove containers (their writable layer and records)."),
}

# `container` gathers commands of two modules (containers, lifecycle), so it is defined here.
container_group = LazyGroup("container", help="Manage containers.", lazy_commands=CONTAINER_COMMANDS)

COMMANDS: dict[str, LazyCommand] = {
    "pull": LazyCommand(f"{_IMAGES}:pull_cmd", "Download an image from a registry."),
    "push": LazyCommand(f"{_IMAGES}:push_cmd", "Upload a local image to the registry its name points at."),
    "tag": LazyCommand(f"{_IMAGES}:tag_cmd", "Give a local image another name."),
    "images": LazyCommand(f"{_IMAGES}:images_cmd", "List local images (optionally only REPOSITORY[:TAG])."),
    "image": LazyCommand("lazyoci.cli.commands:image_group", "Manage images."),
    "rmi": LazyCommand(f"{_IMAGES}:rmi_cmd", "Remove local images; blobs nothing else uses are deleted."),
    "save": LazyCommand(f"{_IMAGES}:save_cmd", "Write images to an OCI archive (with docker's manifest.json, "
                                               "so docker/podman/skopeo load it)."),
    "load": LazyCommand(f"{_IMAGES}:load_cmd", "Load images from an OCI archive or a docker-archive tarball."),
    "import": LazyCommand(f"{_IMAGES}:import_cmd", "Create an image from a root filesystem tarball or directory."),
    "login": LazyCommand(f"{_IMAGES}:login_cmd", "Log in to a registry (credentials go to the docker config)."),
    "logout": LazyCommand(f"{_IMAGES}:logout_cmd", "Forget the stored credentials of a registry."),
    "run": LazyCommand(f"{_CONTAINERS}:run_cmd", "Run a command in a new container (pull progress goes to stderr, "
                                                 "the output to stdout)."),
    "exec": LazyCommand(f"{_CONTAINERS}:exec_cmd", "Run a command in a running container; exit with its exit code."),
    "volume": LazyCommand(f"{_VOLUMES}:volume_group", "Manage volumes."),
    "ps": LazyCommand(f"{_CONTAINERS}:ps_cmd", "List containers."),
    "logs": LazyCommand(f"{_CONTAINERS}:logs_cmd", "Print the output of a detached container."),
    "stop": LazyCommand(f"{_CONTAINERS}:stop_cmd", "Stop running containers (the image's stop signal, then SIGKILL)."),
    "rm": LazyCommand(f"{_CONTAINERS}:rm_cmd", "Remove containers (their writable layer and records)."),
    "container": LazyCommand("lazyoci.cli.commands:container_group", "Manage containers."),
    "inspect": LazyCommand(f"{_LIFECYCLE}:inspect_cmd", "Show containers or images as JSON (a container first, "
                                                        "as docker looks)."),
    "start": CONTAINER_COMMANDS["start"],
    "restart": CONTAINER_COMMANDS["restart"],
    "kill": CONTAINER_COMMANDS["kill"],
    "wait": CONTAINER_COMMANDS["wait"],
    "top": CONTAINER_COMMANDS["top"],
    "cp": CONTAINER_COMMANDS["cp"],
    "soci": LazyCommand(f"{_SOCI}:soci_group", "SOCI indexes: make images lazy-loadable without changing them."),
    "service": LazyCommand(f"{_SERVICE}:service_group",
                           "Manage the lazyoci service that serves lazily loaded layers (FUSE)."),
    "containerd": LazyCommand("lazyoci.cli.containerd:containerd_group",
                              "Use lazyoci with containerd: pull images into it with lazy layers."),
    "build": LazyCommand(f"{_BUILD}:build_cmd", "Build an image from a Dockerfile (with buildah) into the local store."),
    "system": LazyCommand(f"{_SYSTEM}:system_group", "Disk usage and clean-up: system df, system prune."),
    "vm": LazyCommand(f"{_SERVICE}:vm_group",
                      "Alias of `service` for Finch users (there is no VM: the service plays its part)."),
}
