"""The public API is explicit: every package has an `__all__`, its names exist, and what the
README shows being imported from a package is in that package's `__all__`."""

import importlib
import pkgutil
import re
from pathlib import Path

import lazyoci

README = Path(__file__).resolve().parent.parent / "README.md"


def _packages() -> list[str]:
    return ["lazyoci"] + [m.name for m in pkgutil.walk_packages(lazyoci.__path__, "lazyoci.") if m.ispkg]


def test_every_package_has_all():
    missing = [name for name in _packages() if "__all__" not in vars(importlib.import_module(name))]
    assert missing == []


def test_all_names_exist():
    for mod_info in pkgutil.walk_packages(lazyoci.__path__, "lazyoci."):
        if mod_info.name.startswith("lazyoci.cli"):
            continue
        mod = importlib.import_module(mod_info.name)
        for name in getattr(mod, "__all__", ()):
            assert hasattr(mod, name), f"{mod_info.name}.__all__ names missing {name}"


def _readme_imports() -> list[tuple[str, str]]:
    """(module, name) of every `from lazyoci... import ...` in the README's Python code blocks."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = []
    for block in blocks:
        for module, names in re.findall(r"^from (lazyoci[\w.]*) import (\([^)]*\)|[^\n]+)", block, re.M):
            for name in names.strip("()").replace("\n", " ").split(","):
                if name.strip():
                    found.append((module, name.split(" as ")[0].strip()))
    return found


def test_readme_imports_are_in_all():
    found = _readme_imports()
    assert found, "the README's Python API section imports nothing from lazyoci"
    for module, name in found:
        public = importlib.import_module(module).__all__
        assert name in public, f"the README imports {name} from {module}, which does not list it in __all__"
