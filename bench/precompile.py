"""The bytecode of the lazyoci a bench runs, compiled before anything is timed.

An installed package has its modules' bytecode. A shell with PYTHONDONTWRITEBYTECODE (this kind of
machine sets it) writes none, so every `lazyoci` process compiled each module changed since the
tree was last compiled, inside the clock: a tree without bytecode cost a profiled `run` 0.46 s, and
five modules changed by one commit cost it about 30 ms (bench/README.md).
"""

from __future__ import annotations

import compileall
from pathlib import Path


def compile_lazyoci(*srcs: Path | None) -> None:
    """Compile the lazyoci package under each `src/` directory given, or the one this interpreter
    imports (which PYTHONPATH chooses, as for the `lazyoci` processes the bench starts)."""
    packages = [Path(s) / "lazyoci" for s in srcs if s is not None]
    if not packages:
        import lazyoci
        packages = [Path(lazyoci.__file__).parent]
    for package in packages:
        if not compileall.compile_dir(str(package), quiet=1):
            raise SystemExit(f"cannot compile {package}: a bench would time its compilation")
