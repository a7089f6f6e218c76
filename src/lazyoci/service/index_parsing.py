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

It answers twice: once the zTOC is checked and parsed (the entry columns), then once the tree is
built (its columns). A mount can say whether the zTOC is refused as soon as the first answer
comes, and take the tree when it needs it: the pull goes on while the tree is built
(service/layers.py, `LayerManager.mount(attach_later=True)`).

The helper only saves time: whatever goes wrong with it (not started yet, gone, a zTOC it
refuses, a reply that does not fit) and the service parses in its own process as before, which
refuses a bad zTOC with its own error. One helper per service (`python -m` this module, which
takes requests on its standard input and answers on its standard output), started in the
background when the service starts and again when it fails; a mount that finds it busy with
another mount's zTOC parses its own, and one that finds it building another mount's tree waits
for it (a pull's next layer: the tree is the shorter part).
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
from concurrent.futures import Future
from typing import IO, Any

from lazyoci import libc
from lazyoci.errors import LazyociError
from lazyoci.fs.tree import LayerTree
from lazyoci.oci.digest import verify_bytes
from lazyoci.ztoc import Ztoc

__all__ = ["HELPER_MIN_BYTES", "HelperParse", "IndexParser"]

log = logging.getLogger(__name__)

HELPER_MIN_BYTES = 256 << 10    # a smaller zTOC parses in a few ms: not worth the hand-over
HELPER_SECONDS = 60.0           # a helper that takes longer is given up on (the service parses)
TREE_WAIT_SECONDS = 5.0         # a parse waits this long at most for another mount's tree (the
                                # shorter part: 0.1-0.2 s for 30,000 entries; a stuck helper does not
                                # hold every next mount for HELPER_SECONDS)
_LENGTH = struct.Struct("<Q")   # before each pickled message either way


class _Kept(logging.Handler):
    """The helper's log records of one parse, handed back for the service's log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


def _parse(path: str, digest: str) -> tuple[tuple[Any, ...], Ztoc | None]:
    """(In the helper.) The zTOC at `path`, checked against `digest` and parsed: the first reply,
    ("ok", entry columns, log records) or ("refused", why), and the zTOC (None if refused)."""
    kept = _Kept()
    logger = logging.getLogger("lazyoci")
    logger.addHandler(kept)
    try:
        with open(path, "rb") as f:
            data = f.read()
        verify_bytes(data, digest, "zTOC")
        ztoc = Ztoc.parse(data, digest=digest)
        return ("ok", ztoc.entry_columns(), kept.records), ztoc
    except (LazyociError, OSError) as e:
        return ("refused", str(e)), None
    finally:
        logger.removeHandler(kept)


def _tree(ztoc: Ztoc) -> tuple[Any, ...]:
    """(In the helper.) The second reply: ("tree", tree columns, log records), or ("failed", why)."""
    kept = _Kept()
    logger = logging.getLogger("lazyoci")
    logger.addHandler(kept)
    try:
        return "tree", LayerTree(ztoc).columns(), kept.records
    except Exception as e:         # the service builds the tree itself, and meets the error there
        return "failed", f"{type(e).__name__}: {e}"
    finally:
        logger.removeHandler(kept)


def _read_exactly(f: IO[bytes], n: int) -> bytes:
    """`n` bytes, fewer only at the end of the stream (the service's end of the pipe is unbuffered,
    where a read returns what the pipe holds)."""
    chunks, left = [], n
    while left:
        chunk = f.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_message(f: IO[bytes]) -> Any:
    head = _read_exactly(f, _LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (n,) = _LENGTH.unpack(head)
    body = _read_exactly(f, n)
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
        reply, ztoc = _parse(path, digest)
        _write_message(stdout, reply)
        if ztoc is not None:
            _write_message(stdout, _tree(ztoc))
            del ztoc
        gc.collect()               # between mounts: what the parse freed goes back to the OS
        libc.malloc_trim()


def _log(records: list[tuple[int, str]]) -> None:
    """The helper's log records, in the service's log."""
    for level, message in records:
        log.log(level, "%s", message)


class HelperParse:
    """A zTOC the helper checked and parsed (the zTOC the service made of its columns); the tree
    follows in the helper's second reply."""

    def __init__(self, ztoc: Ztoc, tree: "Future[tuple[Any, ...] | None]") -> None:
        self.ztoc = ztoc
        self._tree = tree

    def tree(self) -> LayerTree | None:
        """The layer's tree as the helper built it (waiting for it), or None where the caller should
        build it itself: the helper failed, could not build it, or its reply does not fit."""
        reply = self._tree.result()
        if reply is None:
            return None
        if reply[0] != "tree":
            log.warning("the zTOC parsing helper could not build the tree of %s (%s): building it here",
                        self.ztoc.digest, reply[1])
            return None
        _, columns, records = reply
        _log(records)
        try:
            return LayerTree(self.ztoc, columns=columns)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("the zTOC parsing helper's tree for %s does not fit it (%s): building it here",
                        self.ztoc.digest, e)
            return None


class IndexParser:
    """Parses zTOCs for mounts in the helper process where it pays; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()          # the helper: one zTOC at a time, until its tree is read
        self._state = threading.Lock()         # the fields below
        self._proc: subprocess.Popen | None = None
        self._starting: threading.Thread | None = None
        self._started = threading.Event()
        self._closed = False
        self._tree_under_way = False           # the helper builds a tree: a parse waits for it

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
            # unbuffered replies: a reply read ahead into a buffer would hide from `select`
            proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env, close_fds=True, bufsize=0)
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

    def parse(self, path: str, digest: str, data: bytes) -> "HelperParse | None":
        """The zTOC `data` (checked against `digest` by the caller; the same bytes as the blob at
        `path`) parsed by the helper, whose tree follows; None where the caller should parse itself."""
        if len(data) < HELPER_MIN_BYTES:
            return None                # small: not worth the hand-over
        with self._state:              # busy with another mount's tree: soon free (a pull's next layer)
            tree_only = self._tree_under_way
        if not self._lock.acquire(timeout=TREE_WAIT_SECONDS if tree_only else 0):
            return None                # busy with another mount's zTOC
        tree_follows = False
        try:
            with self._state:
                proc = self._proc
            if proc is None:
                return None            # not started, starting, or closed
            reply = self._ask(proc, (path, digest))
            if reply is None or reply[0] != "ok":    # the caller's own parse says what is wrong
                return None
            # the helper builds the tree now: its reply is taken off the pipe whatever happens here
            tree: Future[tuple[Any, ...] | None] = Future()
            with self._state:
                self._tree_under_way = True
            threading.Thread(target=self._take_tree, args=(proc, tree), name="index-parser-tree",
                             daemon=True).start()
            tree_follows = True
            _, columns, records = reply
            _log(records)
            try:
                return HelperParse(Ztoc.parse(data, digest=digest, columns=columns), tree)
            except (LazyociError, ValueError, TypeError, AttributeError) as e:    # a reply that does not fit
                log.warning("the zTOC parsing helper's reply for %s does not fit it (%s): parsing here", digest, e)
                return None
        finally:
            if not tree_follows:
                self._lock.release()

    def _take_tree(self, proc: subprocess.Popen, tree: "Future[tuple[Any, ...] | None]") -> None:
        """(A thread of its own.) The helper's second reply, into `tree`; the helper is free then."""
        reply = None
        try:
            reply = self._receive(proc)
        finally:
            with self._state:
                self._tree_under_way = False
            self._lock.release()
            tree.set_result(reply)

    def _ask(self, proc: subprocess.Popen, request: tuple[str, str]) -> Any:
        """The helper's first reply to `request`, or None after replacing a helper that is gone or stuck."""
        assert proc.stdin is not None
        try:
            _write_message(proc.stdin, request)
        except Exception as e:
            self._replace(proc, e)
            return None
        return self._receive(proc)

    def _receive(self, proc: subprocess.Popen) -> Any:
        """The helper's next reply, or None after replacing a helper that is gone or stuck."""
        assert proc.stdout is not None
        try:
            if not select.select([proc.stdout], [], [], HELPER_SECONDS)[0]:
                raise TimeoutError(f"no reply in {HELPER_SECONDS:.0f} s")
            reply = _read_message(proc.stdout)
            if reply is None:
                raise EOFError("the helper ended")
            return reply
        except Exception as e:         # gone, stuck, or its reply cut: a new one for the next mount
            self._replace(proc, e)
            return None

    def _replace(self, proc: subprocess.Popen, why: Exception) -> None:
        with self._state:
            if self._proc is proc:
                self._proc = None
            closed = self._closed
        if not closed:                 # (a tree still on its way when the service stops: no news)
            log.warning("the zTOC parsing helper failed (%s): the service parses, and starts another", why)
        _stop(proc)
        self.start()

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
