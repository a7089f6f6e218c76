"""A zTOC's parse and its layer's tree, made in a helper process for the service's mounts.

Mounting a lazy layer parses its zTOC, checking every entry, and builds the layer's directory
tree: Python work of 0.1-0.2 s for a layer of 20,000-30,000 files. In the service it holds the
one interpreter that also receives the recorded prefetch's spans, serves the pull and answers
FUSE requests, so a pull of an image with several large layers mounted them one after another
while the machine's other CPU waited. The helper does that work beside the service: it reads the
zTOC from the blob store, checks it against its digest, parses it and builds the tree, and hands
back the columns both derive (arrays, no object per file). The service then parses the same
bytes, which it checked against the same digest, taking those columns instead of deriving them
again (`Ztoc.parse(columns=)`, `LayerTree(columns=)`).

The helper only saves time: whatever goes wrong with it (not started yet, gone, a zTOC it
refuses, a reply that does not fit) and the service parses in its own process as before, which
refuses a bad zTOC with its own error. One helper per service (`python -m` this module, which
takes requests on its standard input and answers on its standard output), started in the
background when the service starts and again when it fails; a mount that finds it busy with
another mount's zTOC parses its own.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
from typing import IO, Any

from lazyoci import libc
from lazyoci.errors import LazyociError
from lazyoci.fs.tree import LayerTree
from lazyoci.oci.digest import verify_bytes
from lazyoci.ztoc import Ztoc

__all__ = ["IndexParser", "HELPER_MIN_BYTES"]

log = logging.getLogger(__name__)

HELPER_MIN_BYTES = 256 << 10    # a smaller zTOC parses in a few ms: not worth the hand-over
HELPER_SECONDS = 60.0           # a helper that takes longer is given up on (the service parses)
_LENGTH = struct.Struct("<Q")   # before each pickled message either way


class _Kept(logging.Handler):
    """The helper's log records of one parse, handed back for the service's log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


def _parse(path: str, digest: str) -> tuple[Any, ...]:
    """(In the helper.) The zTOC at `path`, checked against `digest`, parsed, its tree built:
    ("ok", entry columns, tree columns, log records), or ("refused", why)."""
    kept = _Kept()
    logger = logging.getLogger("lazyoci")
    logger.addHandler(kept)
    try:
        with open(path, "rb") as f:
            data = f.read()
        verify_bytes(data, digest, "zTOC")
        ztoc = Ztoc.parse(data, digest=digest)
        tree = LayerTree(ztoc)
        return "ok", ztoc.entry_columns(), tree.columns(), kept.records
    except (LazyociError, OSError) as e:
        return "refused", str(e)
    finally:
        logger.removeHandler(kept)


def _read_message(f: IO[bytes]) -> Any:
    head = f.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (n,) = _LENGTH.unpack(head)
    body = f.read(n)
    if len(body) < n:
        return None
    return pickle.loads(body)


def _write_message(f: IO[bytes], message: object) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_LENGTH.pack(len(body)) + body)
    f.flush()


def helper_main() -> None:
    """The helper: one request (path, digest) at a time until its standard input ends."""
    logger = logging.getLogger("lazyoci")
    logger.setLevel(logging.INFO)
    logger.propagate = False       # its records go back to the service, not to a stderr
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr        # nothing else may write into the replies
    _write_message(stdout, "ready")    # its imports done: the service hands it zTOCs from now on
    while True:
        request = _read_message(stdin)
        if request is None:
            return
        path, digest = request
        _write_message(stdout, _parse(path, digest))
        gc.collect()               # between mounts: what the parse freed goes back to the OS
        libc.malloc_trim()


class IndexParser:
    """Parses zTOCs for mounts in the helper process where it pays; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()          # the helper: one parse at a time
        self._state = threading.Lock()         # the fields below
        self._proc: subprocess.Popen | None = None
        self._starting: threading.Thread | None = None
        self._started = threading.Event()
        self._closed = False

    def start(self) -> None:
        """Start the helper in the background (it is used once it runs)."""
        with self._state:
            if self._closed or self._proc is not None or self._starting is not None:
                return
            self._started.clear()
            self._starting = threading.Thread(target=self._launch, name="index-parser-start", daemon=True)
            self._starting.start()

    def _launch(self) -> None:
        import lazyoci

        src = os.path.dirname(os.path.dirname(os.path.abspath(lazyoci.__file__)))   # this lazyoci, not another
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        proc = None
        try:
            proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env, close_fds=True)
            assert proc.stdout is not None
            if not select.select([proc.stdout], [], [], HELPER_SECONDS)[0] or _read_message(proc.stdout) != "ready":
                raise OSError("it did not start")
        except Exception as e:         # no helper: the service parses itself
            log.warning("cannot start the zTOC parsing helper: %s", e)
            if proc is not None:
                _stop(proc)
                proc = None
        with self._state:
            self._starting = None
            late = proc if self._closed else None     # closed while it started
            self._proc = None if self._closed else proc
        if late is not None:
            _stop(late)
        self._started.set()

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether the helper runs and takes zTOCs, waiting up to `timeout` seconds for it."""
        self._started.wait(timeout)
        with self._state:
            return self._proc is not None and self._proc.poll() is None

    def parse(self, path: str, digest: str, data: bytes) -> tuple[Ztoc, LayerTree] | None:
        """The zTOC `data` (checked against `digest` by the caller; the same bytes as the blob at
        `path`) and its tree, made by the helper; None where the caller should parse itself."""
        if len(data) < HELPER_MIN_BYTES or not self._lock.acquire(blocking=False):
            return None                # small, or the helper is busy with another mount's
        try:
            with self._state:
                proc = self._proc
            if proc is None:
                return None            # not started, starting, or closed
            reply = self._ask(proc, (path, digest))
        finally:
            self._lock.release()
        if reply is None:
            return None
        if reply[0] != "ok":           # the caller's own parse says what is wrong with this zTOC
            return None
        _, columns, tree_columns, records = reply
        for level, message in records:
            log.log(level, "%s", message)
        try:
            ztoc = Ztoc.parse(data, digest=digest, columns=columns)
            return ztoc, LayerTree(ztoc, columns=tree_columns)
        except (LazyociError, ValueError, TypeError, AttributeError) as e:    # a reply that does not fit
            log.warning("the zTOC parsing helper's reply for %s does not fit it (%s): parsing here", digest, e)
            return None

    def _ask(self, proc: subprocess.Popen, request: tuple[str, str]) -> Any:
        """The helper's reply, or None after replacing a helper that is gone or stuck."""
        assert proc.stdin is not None and proc.stdout is not None
        try:
            _write_message(proc.stdin, request)
            if not select.select([proc.stdout], [], [], HELPER_SECONDS)[0]:
                raise TimeoutError(f"no reply in {HELPER_SECONDS:.0f} s")
            reply = _read_message(proc.stdout)
            if reply is None:
                raise EOFError("the helper ended")
            return reply
        except Exception as e:         # gone, stuck, or its reply cut: a new one for the next mount
            log.warning("the zTOC parsing helper failed (%s): the service parses, and starts another", e)
            with self._state:
                if self._proc is proc:
                    self._proc = None
            _stop(proc)
            self.start()
            return None

    def close(self) -> None:
        with self._state:
            self._closed = True
            proc, self._proc = self._proc, None
        if proc is not None:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """End the helper: its input closed, then killed if it does not end at once."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(1.0)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    helper_main()
