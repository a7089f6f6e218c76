"""Run one fuzz target under atheris (libFuzzer): `python tests/fuzz/run.py TARGET CORPUS [flags]`.

lazyoci is imported inside `atheris.instrument_imports` so that its code is coverage-guided;
libFuzzer's flags (`-max_total_time=`, `-timeout=`, `-rss_limit_mb=`, ...) pass through.
A crash is an exception other than LazyociError, a hang past -timeout, or memory past the limit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path


def _start_the_peak_rss_afresh() -> None:
    """libFuzzer's -rss_limit_mb reads the process's peak RSS, which Linux carries over exec from
    the parent: started from a test process that once held a gigabyte, the fuzzer would stop at its
    first input. A forked child counts from its own (small) size; the parent passes on its status."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        os._exit(code if code >= 0 else 128 - code)            # killed by a signal: 128 + signal
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)                 # PR_SET_PDEATHSIG: a killed runner stops the fuzzer
    if os.getppid() != parent:                                 # ... killed before that was set
        os._exit(1)


_start_the_peak_rss_afresh()

import atheris  # noqa: E402

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
