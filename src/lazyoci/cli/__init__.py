"""The `lazyoci` command: a thin shell over the library (entry point `lazyoci.cli.main:main`).

It has no Python API of its own; its modules are imported by the command that runs them.
"""

__all__: list[str] = []
