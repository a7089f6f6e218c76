"""The SQLite database of the data root, shared by every area and every lazyoci process.

WAL lets readers run beside one writer; write transactions start with
BEGIN IMMEDIATE so that two processes never both hold a read lock and then
deadlock upgrading it; the busy timeout makes a second writer wait instead of
failing. Each area owns its tables and creates them with `ensure_schema`.

The database holds every container's command and image; it is created 0600
(SQLite gives its -wal and -shm files the database's own mode), whatever the umask.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from lazyoci.errors import StoreError
from lazyoci.store.modes import PRIVATE_FILE_MODE

BUSY_TIMEOUT_MS = 30_000


class Database:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._known: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._wal_done = False
        self._created = False

    def _create_private(self) -> None:
        """Create the database file 0600 before SQLite does (SQLite would make it 0644), or close it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        try:
            if os.fstat(fd).st_mode & 0o7777 != PRIVATE_FILE_MODE:
                os.fchmod(fd, PRIVATE_FILE_MODE)
        finally:
            os.close(fd)
        self._created = True

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
                conn.execute("PRAGMA journal_mode=WAL")
                self._wal_done = True
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
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
        digest = hashlib.sha256(ddl.encode()).hexdigest()
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
