"""Every package's __all__ names things that exist (the public API is explicit)."""

import importlib
import pkgutil

import lazyoci


def test_all_names_exist():
    for mod_info in pkgutil.walk_packages(lazyoci.__path__, "lazyoci."):
        if mod_info.name.startswith("lazyoci.cli"):
            continue
        mod = importlib.import_module(mod_info.name)
        for name in getattr(mod, "__all__", ()):
            assert hasattr(mod, name), f"{mod_info.name}.__all__ names missing {name}"
