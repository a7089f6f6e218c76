"""Container commands: run, exec, ps, logs, stop, rm, and image mount / unmount."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from lazyoci.cli.context import app
from lazyoci.cli.durations import human_duration
from lazyoci.cli.shared import image_service, info_line, lazy_label
from lazyoci.config import PULL_POLICIES, RUNTIMES, SNAPSHOTTERS
from lazyoci.errors import ConfigError, LazyociError
from lazyoci.runtime.containers import ContainerRecord, ContainerStore
from lazyoci.store.layout import DataRoot

if TYPE_CHECKING:
    from lazyoci.cli.progress import ProgressDisplay
    from lazyoci.runtime.run import ContainerManager


def _manager() -> ContainerManager:
    from lazyoci.runtime.run import ContainerManager

    ctx = app()
    return ContainerManager(DataRoot(ctx.root), ctx.config, image_service(ctx), notices=info_line)


@click.command("run", context_settings={"allow_interspersed_args": False})
@click.option("--snapshotter", type=click.Choice(SNAPSHOTTERS), default=None,
              help="How to prepare the image's layers (default: the config's first snapshotter).")
@click.option("--rm", "auto_remove", is_flag=True, help="Remove the container when it exits.")
@click.option("-d", "--detach", is_flag=True, help="Run in the background and print the container ID.")
@click.option("-i", "--interactive", is_flag=True, help="Pass stdin to the container.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a terminal.")
@click.option("--name", help="Container name (default: a random one).")
@click.option("-e", "--env", multiple=True, help="Set KEY=VALUE (or KEY: take it from this environment).")
@click.option("--env-file", type=click.Path(path_type=Path), multiple=True, help="Read KEY=VALUE lines.")
@click.option("--entrypoint", default=None, help="Replace the image's Entrypoint (clears its Cmd).")
@click.option("-w", "--workdir", default=None, help="Working directory inside the container.")
@click.option("-u", "--user", default=None, help="USER[:GROUP], by name or number.")
@click.option("--platform", default=None, help="os/arch[/variant] of the image (default: this host).")
@click.option("--pull", "pull_policy", type=click.Choice(PULL_POLICIES), default="missing",
              help="Pull the image: when missing (default), always, or never.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default=None, help="OCI runtime (default: config).")
@click.option("--soci-index-digest", default=None, help="Use this SOCI index instead of discovering one.")
@click.option("-v", "--volume", "volumes", multiple=True,
              help="Mount HOST-PATH:CONTAINER-PATH[:ro], a named volume NAME:PATH[:ro], or an anonymous volume PATH.")
@click.option("--mount", "mount_flags", multiple=True,
              help="type=bind|volume|tmpfs,source=...,target=...[,readonly] (docker's --mount).")
@click.option("--tmpfs", multiple=True, help="Mount a tmpfs at PATH[:OPTIONS].")
@click.option("--read-only", is_flag=True, help="Mount the container's root filesystem read-only.")
@click.option("--cap-add", multiple=True, help="Add a Linux capability (or ALL).")
@click.option("--cap-drop", multiple=True, help="Drop a Linux capability (or ALL).")
@click.option("--privileged", is_flag=True, help="Every capability, no masked /proc paths, every device.")
@click.option("-m", "--memory", default=None, help="Memory limit (bytes, or with a b/k/m/g suffix).")
@click.option("--cpus", default=None, help="Number of CPUs (a quota, e.g. 1.5).")
@click.option("--hostname", default=None, help="The container's host name (default: this host's).")
@click.option("-l", "--label", "labels", multiple=True, help="Set a KEY=VALUE label on the container.")
@click.option("--restart", default="no", show_default=True,
              help="Restart policy of a detached container: no or on-failure[:MAX-RETRIES].")
@click.argument("ref")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run_cmd(snapshotter, auto_remove, detach, interactive, tty, name, env, env_file, entrypoint, workdir,
            user, platform, pull_policy, runtime, soci_index_digest, volumes, mount_flags, tmpfs, read_only,
            cap_add, cap_drop, privileged, memory, cpus, hostname, labels, restart, ref, command) -> None:
    """Run a command in a new container (pull progress goes to stderr, the output to stdout)."""
    from lazyoci.oci.platform import Platform
    from lazyoci.runtime.bundle import HostOptions, ProcessOptions, parse_cpus, parse_env_file
    from lazyoci.runtime.run import RunOptions
    from lazyoci.runtime.volumes import parse_bytes, parse_mount_flag, parse_tmpfs_flag, parse_volume_flag

    ctx = app()
    env_items: tuple[str, ...] = ()
    for f in env_file:
        env_items += parse_env_file(f)
    env_items += tuple(env)
    opts = RunOptions(
        image=ref,
        process=ProcessOptions(args=tuple(command), entrypoint=entrypoint, env=env_items, workdir=workdir,
                               user=user, tty=tty),
        name=name, detach=detach, interactive=interactive, auto_remove=auto_remove,
        snapshotter=snapshotter or ctx.config.default_snapshotter,
        runtime=runtime or ctx.config.runtime, pull=pull_policy,
        platform=Platform.parse(platform) if platform else None,
        soci_index_digest=soci_index_digest,
        host=HostOptions(read_only=read_only, cap_add=tuple(cap_add), cap_drop=tuple(cap_drop),
                         privileged=privileged, memory=parse_bytes(memory, "--memory") if memory else None,
                         cpus=parse_cpus(cpus) if cpus is not None else None, hostname=hostname, labels=_labels(labels)),
        mounts=(tuple(parse_volume_flag(v) for v in volumes) + tuple(parse_mount_flag(m) for m in mount_flags)
                + tuple(parse_tmpfs_flag(t) for t in tmpfs)),
        restart=restart)
    mgr = _manager()
    progress = _LazyProgress()
    try:
        rec, rt = mgr.create(opts, progress=progress)
    finally:
        progress.close()
    code = mgr.start(rec, rt, opts)
    if detach:
        click.echo(rec.id)
        return
    sys.stdout.flush()
    # SystemExit, not click's Exit: it must pass through main() unchanged.
    sys.exit(code or 0)


def _labels(items: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """--label KEY=VALUE (a bare KEY has an empty value, as in docker)."""
    out = []
    for item in items:
        key, _, value = item.partition("=")
        if not key:
            raise ConfigError(f"invalid --label {item!r}: use KEY=VALUE")
        out.append((key, value))
    return tuple(out)


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Pass stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a terminal.")
@click.option("-e", "--env", multiple=True, help="Set KEY=VALUE (or KEY: take it from this environment).")
@click.option("-u", "--user", default=None, help="USER[:GROUP], by name or number.")
@click.option("-w", "--workdir", default=None, help="Working directory inside the container.")
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(interactive: bool, tty: bool, env: tuple[str, ...], user: str | None, workdir: str | None,
             container: str, command: tuple[str, ...]) -> None:
    """Run a command in a running container; exit with its exit code."""
    from lazyoci.runtime.exec import ExecOptions, exec_in_container

    root = DataRoot(app().root)
    opts = ExecOptions(args=command, interactive=interactive, tty=tty, env=env, user=user, workdir=workdir)
    code = exec_in_container(root, ContainerStore(root), container, opts)
    sys.stdout.flush()
    sys.exit(code)


class _LazyProgress:
    """Pull progress rows on stderr, drawn only if a pull actually happens."""

    def __init__(self) -> None:
        self._display: ProgressDisplay | None = None

    def __call__(self, event) -> None:
        if self._display is None:
            from lazyoci.cli.progress import ProgressDisplay

            self._display = ProgressDisplay(sys.stderr).__enter__()
        self._display(event)

    def close(self) -> None:
        if self._display is not None:
            self._display.close()


def _ago(ts: float) -> str:
    return human_duration(max(0.0, time.time() - ts)) + " ago"


def _status(rec: ContainerRecord) -> str:
    if rec.status == "running":
        return f"Up {human_duration(max(0.0, time.time() - rec.created))}"
    if rec.status == "exited":
        code = "unknown" if rec.exit_code is None else rec.exit_code
        return f"Exited ({code}) {_ago(rec.finished or rec.created)}"
    return "Created"


def _command(rec: ContainerRecord) -> str:
    text = " ".join(rec.command)
    return json.dumps(text if len(text) <= 20 else text[:19] + "…", ensure_ascii=False)


@click.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Show every container (default: running).")
@click.option("-q", "--quiet", is_flag=True, help="Only IDs.")
@click.option("-f", "--filter", "filters", multiple=True,
              help="KEY=VALUE: id, name, status, exited, ancestor, before, since, snapshotter, label.")
@click.option("--format", "fmt", default=None, help="'{{json .}}', or a Go template of the fields ('table ...').")
def ps_cmd(show_all: bool, quiet: bool, filters: tuple[str, ...], fmt: str | None) -> None:
    """List containers."""
    from lazyoci.runtime.filters import ContainerFilter

    wanted = ContainerFilter.parse(filters)
    store = ContainerStore(DataRoot(app().root).ensure())   # the records only: no image service
    recs = wanted.apply([r for r in store.list() if show_all or wanted.wants_all or r.status == "running"],
                        store.labels)
    if quiet:
        for r in recs:
            click.echo(r.short_id)
        return
    if fmt is not None:
        _ps_formatted(recs, fmt)
        return
    rows = [("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "SNAPSHOTTER", "NAMES")]
    rows += [(r.short_id, r.image, _command(r), _ago(r.created), _status(r), _snapshotter(r), r.name)
             for r in recs]
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    for row in rows:
        click.echo("   ".join(c.ljust(w) for c, w in zip(row, widths)) + "   " + row[6])


_PS_TITLES = {"ID": "CONTAINER ID", "Image": "IMAGE", "Command": "COMMAND", "CreatedAt": "CREATED AT",
              "RunningFor": "CREATED", "Ports": "PORTS", "State": "STATE", "Status": "STATUS", "Size": "SIZE",
              "Names": "NAMES", "Labels": "LABELS", "Mounts": "MOUNTS", "Networks": "NETWORKS",
              "LocalVolumes": "LOCAL VOLUMES", "Snapshotter": "SNAPSHOTTER"}


def _ps_formatted(recs: list[ContainerRecord], fmt: str) -> None:
    """docker's `ps --format`: the same fields, as strings, for each container."""
    from lazyoci.cli.gotemplate import Template, format_rows

    template = Template.parse(fmt, tuple(_PS_TITLES))
    rows = [{"ID": r.short_id, "Image": r.image, "Command": _command(r),
             "CreatedAt": time.strftime("%Y-%m-%d %H:%M:%S %z %Z", time.localtime(r.created)),
             "RunningFor": _ago(r.created), "Ports": "", "State": r.status, "Status": _status(r), "Size": "",
             "Names": r.name, "Labels": "", "Mounts": "", "Networks": "host", "LocalVolumes": "0",
             "Snapshotter": _snapshotter(r)} for r in recs]
    for line in format_rows(template, rows, _PS_TITLES):
        click.echo(line)


def _snapshotter(rec: ContainerRecord) -> str:
    """"soci" only when a layer of the container really is lazy: a fallback is never shown as lazy."""
    if rec.snapshotter not in ("soci", "stargz"):
        return rec.snapshotter
    try:
        from lazyoci.snapshot.soci import SociSnapshotter

        lazy = SociSnapshotter(DataRoot(app().root), app().config).is_lazy(rec.snapshot_key)
    except (LazyociError, ImportError):
        return rec.snapshotter
    return lazy_label(rec.snapshotter, rec.image) if lazy else f"{rec.snapshotter} (not lazy)"


@click.command("logs")
@click.option("-f", "--follow", is_flag=True, help="Keep printing output until the container exits.")
@click.option("-n", "--tail", default="all", help="Only the last N lines (default: all).")
@click.option("-t", "--timestamps", is_flag=True, help="Start each line with the time it arrived (RFC 3339).")
@click.option("--since", default=None, help="Only lines since a time: 10m, 1h30m, a Unix time or RFC 3339.")
@click.argument("container")
def logs_cmd(follow: bool, tail: str, timestamps: bool, since: str | None, container: str) -> None:
    """Print the output of a detached container."""
    from lazyoci.runtime.logfile import parse_since, parse_tail

    lines = parse_tail(tail)
    since_ns = parse_since(since) if since is not None else None
    _manager().logs(container, sys.stdout.buffer, follow, lines, since_ns, timestamps)


@click.command("stop")
@click.option("-t", "--time", "timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait after the stop signal before killing.")
@click.argument("containers", nargs=-1, required=True)
def stop_cmd(timeout: float, containers: tuple[str, ...]) -> None:
    """Stop running containers (the image's stop signal, then SIGKILL)."""
    mgr = _manager()
    for c in containers:
        mgr.stop(c, timeout)
        click.echo(c)


@click.command("rm")
@click.option("-f", "--force", is_flag=True, help="Kill a running container first.")
@click.option("-v", "--volumes", is_flag=True, help="Also remove the anonymous volumes of the containers.")
@click.argument("containers", nargs=-1, required=True)
def rm_cmd(force: bool, volumes: bool, containers: tuple[str, ...]) -> None:
    """Remove containers (their writable layer and records)."""
    mgr = _manager()
    for c in containers:
        mgr.remove(c, force, volumes)
        click.echo(c)


@click.command("mount")
@click.option("--snapshotter", type=click.Choice(SNAPSHOTTERS), default=None)
@click.option("--platform", default=None)
@click.option("--soci-index-digest", default=None, help="Use this SOCI index instead of discovering one.")
@click.argument("ref")
@click.argument("directory", type=click.Path(path_type=Path))
def image_mount_cmd(snapshotter: str | None, platform: str | None, soci_index_digest: str | None,
                    ref: str, directory: Path) -> None:
    """Mount an image's root filesystem read-only at DIRECTORY (pulling it if needed)."""
    from lazyoci.oci.platform import Platform
    from lazyoci.runtime.image_mount import mount_image

    ctx = app()
    progress = _LazyProgress()
    try:
        mount_image(DataRoot(ctx.root), ctx.config, image_service(ctx), ref,
                    snapshotter or ctx.config.default_snapshotter, directory.absolute(),
                    Platform.parse(platform) if platform else None, progress, soci_index_digest, info_line)
    finally:
        progress.close()


@click.command("unmount")
@click.argument("directory", type=click.Path(path_type=Path))
def image_unmount_cmd(directory: Path) -> None:
    """Unmount what `image mount` mounted at DIRECTORY."""
    from lazyoci.runtime.image_mount import unmount_image

    ctx = app()
    unmount_image(DataRoot(ctx.root), ctx.config, directory.absolute())
