"""Run one fuzz target under atheris (libFuzzer): `python tests/fuzz/run.py TARGET CORPUS [flags]`.

lazyoci is imported inside `atheris.instrument_imports` so that its code is coverage-guided;
libFuzzer's flags (`-max_total_time=`, `-timeout=`, `-rss_limit_mb=`, ...) pass through.
A crash is an exception other than LazyociError, a hang past -timeout, or memory past the limit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["lazyoci"]):
    import targets


def main() -> None:
    name = sys.argv[1]
    target = targets.TARGETS[name]

    def one_input(data: bytes) -> None:
        targets.run_one(target, data)

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
