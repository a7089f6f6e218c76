"""The `lazyoci` command: global options, command registration, and the error edge.

Commands live in one module per area (images, containers, soci, service) and
are thin: they parse flags, call the library, and print.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn

import click

from lazyoci import __version__
from lazyoci.cli.commands import COMMANDS, LazyGroup
from lazyoci.cli.context import AppContext
from lazyoci.config import default_root, load_config
from lazyoci.errors import ConfigError, LazyociError
from lazyoci.store.layout import DataRoot


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lazyoci")
@click.option("--root", type=click.Path(path_type=Path), default=None,
              help="Data root (env LAZYOCI_ROOT; default /var/lib/lazyoci for root).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Config file (env LAZYOCI_CONFIG; default ~/.lazyoci/config.yaml).")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--insecure-registry", multiple=True,
              help="Allow plain HTTP or unverified TLS for this registry host (repeatable).")
@click.pass_context
def cli(ctx: click.Context, root: Path | None, config_path: Path | None, debug: bool,
        insecure_registry: tuple[str, ...]) -> None:
    """lazyoci: containers that start before their images finish downloading."""
    data_root = _data_root(root or default_root())
    config = load_config(config_path, kept=data_root.config_document)
    ctx.obj = AppContext(
        root=data_root.path,
        config=config,
        debug=debug,
        insecure_registries=tuple(insecure_registry) + config.insecure_registries,
    )


def _data_root(path: Path) -> DataRoot:
    """The data root, absolute and created; one clear error if it cannot be a directory."""
    root = DataRoot(path.absolute())
    try:
        root.ensure()
    except FileExistsError:
        raise ConfigError(f"data root {root.path} is not a directory") from None
    except OSError as e:
        raise ConfigError(f"cannot create data root {root.path}: {e.strerror or e}") from None
    return root


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one clear line on stderr and a nonzero exit for every LazyociError."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        # standalone_mode=False returns a command's exit code instead of exiting.
        rc = cli.main(args=argv, prog_name="lazyoci", standalone_mode=False)
    except LazyociError as e:
        if debug:
            raise
        click.echo(f"lazyoci: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("lazyoci: interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("lazyoci: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)
    except OSError as e:       # the output itself failed (a full disk under a redirect): one line
        if debug:
            raise
        click.echo(f"lazyoci: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


def entry() -> NoReturn:
    """The console script: `main`, then the process ends without tearing the interpreter down.

    Freeing a few hundred modules one object at a time took 10-20 ms after every command had
    already answered (a lazy start pays it for `pull`). What the normal exit does that matters
    still happens: the atexit callbacks (log handlers flushed, temporary files removed) and the
    flush of stdout and stderr. While a thread that is not a daemon still runs, the normal exit
    waits for it, as Python's own exit does."""
    try:
        main()
        code = 0
    except SystemExit as e:
        if not isinstance(e.code, int) and e.code is not None:
            raise                      # a message to print: Python's own exit does that
        code = e.code or 0
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = code or 141
    except OSError:
        code = code or 1
    os._exit(code)
