"""What every command gets from the global options: data root, config, debug."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from lazyoci.config import Config


@dataclass(frozen=True)
class AppContext:
    root: Path
    config: Config
    debug: bool
    insecure_registries: tuple[str, ...]


def app(ctx: click.Context | None = None) -> AppContext:
    """The AppContext of the running command (set up by the top-level group)."""
    ctx = ctx or click.get_current_context()
    return ctx.find_root().obj
