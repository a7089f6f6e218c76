"""The SQLite database of the data root, shared by every area and every lazyoci process.

WAL lets readers run beside one writer; write transactions start with
BEGIN IMMEDIATE so that two processes never both hold a read lock and then
deadlock upgrading it; the busy timeout makes a second writer wait instead of
failing. Each area owns its tables and creates them with `ensure_schema`.

The database holds every container's command and image; it is created 0600
(SQLite gives its -wal and -shm files the database's own mode), whatever the umask.

A process keeps one idle connection open per database file (its anchor): in WAL mode the
connection that closes last checkpoints the WAL into the database and fsyncs both, and with
a connection per transaction that was nearly every close (about 10 ms each, and a lock the
other processes wait on: a third of a lazy pull). An anchor runs one statement and holds no
lock but WAL's shared one; anchors are closed before os.fork() (an SQLite connection must
not cross a fork) and opened again by the next connect. A process keeps a few at most.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lazyoci.errors import StoreError
from lazyoci.store.modes import PRIVATE_FILE_MODE

BUSY_TIMEOUT_MS = 30_000
MAX_ANCHORS = 4

_anchors: dict[str, sqlite3.Connection] = {}      # database path -> its idle connection, oldest first
_anchors_lock = threading.Lock()


def _keep_open(path: Path) -> None:
    """Open the anchor of `path` if this process has none (see the module's docstring)."""
    key = os.fspath(path)
    if key in _anchors:
        return
    with _anchors_lock:
        if key in _anchors:
            return
        anchor = sqlite3.connect(key, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                 check_same_thread=False)
        anchor.execute("PRAGMA schema_version").fetchone()    # maps the WAL index: its shared lock
        _anchors[key] = anchor
        while len(_anchors) > MAX_ANCHORS:
            _anchors.pop(next(iter(_anchors))).close()


def _set_wal(conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode. Of every statement here only this one moves from a read lock
    to an exclusive one outside BEGIN IMMEDIATE: when processes open a new database at once, one
    may find another waiting for the exclusive lock, and SQLite then answers "database is locked"
    at once instead of waiting (the busy timeout would deadlock them). It lets go of its read lock
    with the error, so asking again, until the busy timeout has passed, gets the mode or finds it set."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def close_anchors() -> None:
    """Close this process's idle connections (before a fork; the next connect opens them again)."""
    with _anchors_lock:
        anchors = list(_anchors.values())
        _anchors.clear()
    for conn in anchors:
        conn.close()


os.register_at_fork(before=close_anchors)


def close_anchor(path: Path) -> None:
    """Close the idle connection of one database (its data root is being let go: unmounted, removed)."""
    with _anchors_lock:
        anchor = _anchors.pop(os.fspath(path), None)
    if anchor is not None:
        anchor.close()


class Database:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._known: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._wal_done = False
        self._created = False

    def _create_private(self) -> None:
        """Create the database file 0600 before SQLite does (SQLite would make it 0644), or close it.

        An existing file is never opened here: closing any descriptor of it drops every POSIX
        lock this process holds on it, also those of SQLite's open connections (the anchor's),
        and another process could then checkpoint and truncate the WAL under them."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         PRIVATE_FILE_MODE)
        except FileExistsError:
            st = os.lstat(self.path)
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.ELOOP, "it is a symbolic link") from None
            if stat.S_IMODE(st.st_mode) != PRIVATE_FILE_MODE:
                os.chmod(self.path, PRIVATE_FILE_MODE)
        else:
            try:
                os.fchmod(fd, PRIVATE_FILE_MODE)
            finally:
                os.close(fd)
        self._created = True

    def close(self) -> None:
        """Let go of the database: this process keeps no connection to it open (see close_anchor)."""
        close_anchor(self.path)

    def connect(self) -> sqlite3.Connection:
        """A new connection (autocommit mode: use `transaction()` or explicit BEGIN for writes)."""
        try:
            if not self._created:
                self._create_private()
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys=ON")
            if not self._wal_done:
                # journal_mode is persistent in the file; set it once per process.
                _set_wal(conn)
                self._wal_done = True
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
            _keep_open(self.path)
            return conn
        except OSError as e:
            raise StoreError(f"cannot open database {self.path}: {e.strerror or e}") from None
        except sqlite3.Error as e:
            raise StoreError(f"cannot open database {self.path}: {e}") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any exception."""
        conn = self.connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"database {self.path}: {e}") from None
        finally:
            conn.close()

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads (each statement sees a consistent snapshot)."""
        conn = self.connect()
        try:
            yield conn
        except sqlite3.Error as e:
            raise StoreError(f"database {self.path}: {e}") from None
        finally:
            conn.close()

    def ensure_schema(self, name: str, ddl: str) -> None:
        """Create an area's tables once; `ddl` must be idempotent (CREATE ... IF NOT EXISTS).

        A table `schema_versions` remembers the hash of each area's DDL so that
        processes skip the script when nothing changed.
        """
        digest = _sha256_hex(ddl.encode())
        with self._lock:
            if (name, digest) in self._known:
                return
            conn = self.connect()
            try:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_versions "
                             "(name TEXT PRIMARY KEY, ddl_sha256 TEXT NOT NULL)")
                row = conn.execute("SELECT ddl_sha256 FROM schema_versions WHERE name=?",
                                   (name,)).fetchone()
                if row is None or row[0] != digest:
                    # executescript commits first; the DDL is idempotent so a race is harmless.
                    conn.executescript(ddl)
                    conn.execute("INSERT OR REPLACE INTO schema_versions VALUES (?, ?)", (name, digest))
            except sqlite3.Error as e:
                raise StoreError(f"database {self.path}: schema {name}: {e}") from None
            finally:
                conn.close()
            self._known.add((name, digest))


def _sha256_hex(data: bytes) -> str:
    """SHA-256 from CPython's built-in module where there is one: `hashlib` loads OpenSSL
    (13 ms of a cold `lazyoci ps`, which hashes nothing but its schema scripts)."""
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # CPython 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # type: ignore[import-not-found]  # CPython 3.12+
        except ImportError:
            from hashlib import sha256
    return sha256(data).hexdigest()
