"""The local store: verified atomic blobs, SQLite under concurrency, leases and gc."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from lazyoci.errors import IntegrityError, StoreError
from lazyoci.store.blobs import BlobStore
from lazyoci.store.db import Database
from lazyoci.store.layout import DataRoot
from lazyoci.store.image_records import ImageRecords


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(DataRoot(tmp_path / "root"))


def test_blob_is_published_only_when_verified(store):
    data = os.urandom(300_000)
    d = sha(data)
    with store.writer(d, len(data)) as w:
        w.write(data[:1000])
        assert not store.has(d)                  # nothing visible while writing
        assert len(list(store.root.tmp.iterdir())) == 1
        w.write(data[1000:])
    assert store.has(d) and store.read(d) == data
    assert list(store.root.tmp.iterdir()) == []


@pytest.mark.parametrize("bad", ["wrong", "short", "long"])
def test_bad_bytes_leave_nothing(store, bad):
    data = os.urandom(10_000)
    d = sha(data)
    payload = {"wrong": data[:-1] + bytes([data[-1] ^ 1]), "short": data[:-10], "long": data + b"x"}[bad]
    with pytest.raises(IntegrityError):
        with store.writer(d, len(data)) as w:
            w.write(payload)
    assert not store.has(d)
    assert list(store.root.tmp.iterdir()) == []
    assert list(store.digests()) == []


def test_exception_mid_write_removes_temp(store):
    with pytest.raises(KeyboardInterrupt):
        with store.writer(sha(b"abc"), 3) as w:
            w.write(b"a")
            raise KeyboardInterrupt
    assert list(store.root.tmp.iterdir()) == []


def test_corrupt_local_blob_is_detected_on_read(store):
    d = store.put_bytes(b'{"a":1}')
    store.path(d).write_bytes(b'{"a":2}')
    with pytest.raises(IntegrityError, match="local store is corrupt"):
        store.read(d)


def test_stale_temp_files_are_cleaned_but_live_ones_kept(store):
    live = store.writer(sha(b"live"), 4)
    live.write(b"li")
    stale = store.root.tmp / "deadbeef.123.part"     # what a killed process leaves
    stale.write_bytes(b"half")
    old = time.time() - 60
    os.utime(stale, (old, old))
    os.utime(live.tmp_path, (old, old))
    assert store.clean_tmp() == 1
    assert not stale.exists() and live.tmp_path.exists()
    live.write(b"ve")
    live.commit()
    assert store.read(sha(b"live")) == b"live"


def test_a_fresh_temp_file_goes_once_its_writer_has_ended_even_unreaped(store):
    """A temporary file younger than `min_age` is left to its writer while that process runs, and
    removed once it has ended, also while it waits as a zombie for its parent to reap it."""
    import subprocess
    import sys

    from lazyoci.proc_stat import stat_fields

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while (stat_fields(child.pid) or ["?"])[0] != "Z":      # ended, not reaped
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        ended = store.root.tmp / f"{'0' * 16}.{child.pid}.abc.part"
        alive = store.root.tmp / f"{'1' * 16}.{os.getpid()}.abc.part"
        for f in (ended, alive):
            f.write_bytes(b"half")
        assert store.clean_tmp() == 1
        assert not ended.exists() and alive.exists()
    finally:
        child.wait()


def test_invalid_digest_is_refused(store):
    with pytest.raises(Exception, match="invalid digest"):
        store.path("sha256:xyz")
    with pytest.raises(StoreError, match="not in the local store"):
        store.open(sha(b"nothing"))


def _writer_process(db_path: str, worker: int, n: int) -> None:
    db = Database(Path(db_path))
    db.ensure_schema("t", "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER);")
    for i in range(n):
        with db.transaction() as c:
            row = c.execute("SELECT v FROM t WHERE k='counter'").fetchone()
            c.execute("INSERT OR REPLACE INTO t VALUES ('counter', ?)", ((row[0] if row else 0) + 1,))
            c.execute("INSERT INTO t VALUES (?, ?)", (f"w{worker}-{i}", i))


def test_database_is_safe_under_concurrent_processes(tmp_path):
    db_path = tmp_path / "lazyoci.db"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(str(db_path), w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    db = Database(db_path)
    with db.reading() as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # read-modify-write under BEGIN IMMEDIATE: no lost update
        assert c.execute("SELECT v FROM t WHERE k='counter'").fetchone()[0] == 200
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 201


def test_closing_a_connection_does_not_checkpoint_the_wal(tmp_path):
    """The process keeps the database open between transactions, so a transaction's close is not
    the last one: the WAL is not checkpointed and removed (with its fsyncs) at every commit."""
    db = Database(tmp_path / "x.db")
    db.ensure_schema("a", "CREATE TABLE IF NOT EXISTS a (x INTEGER);")
    with db.transaction() as c:
        c.execute("INSERT INTO a VALUES (1)")
    wal = tmp_path / "x.db-wal"
    assert wal.exists() and wal.stat().st_size > 0
    with Database(tmp_path / "x.db").reading() as c:     # another process's view of it
        assert c.execute("SELECT x FROM a").fetchall()[0][0] == 1


def test_no_connection_crosses_a_fork(tmp_path):
    """A forked child (the container monitor) opens the database afresh: the idle connection
    of the parent is closed before the fork, and the child's writes reach the parent."""
    from lazyoci.store import db as db_module

    db = Database(tmp_path / "x.db")
    db.ensure_schema("a", "CREATE TABLE IF NOT EXISTS a (x INTEGER);")
    assert db_module._anchors
    pid = os.fork()
    if pid == 0:     # pragma: no cover - the child
        code = 1
        try:
            inherited = bool(db_module._anchors)
            with Database(tmp_path / "x.db").transaction() as c:
                c.execute("INSERT INTO a VALUES (7)")
            code = 3 if inherited else 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with db.reading() as c:
        assert c.execute("SELECT x FROM a").fetchall()[0][0] == 7


def test_ensure_schema_is_idempotent(tmp_path):
    db = Database(tmp_path / "x.db")
    ddl = "CREATE TABLE IF NOT EXISTS a (x INTEGER);"
    db.ensure_schema("a", ddl)
    db.ensure_schema("a", ddl)
    Database(tmp_path / "x.db").ensure_schema("a", ddl)
    with db.reading() as c:
        assert c.execute("SELECT name FROM schema_versions").fetchall()[0][0] == "a"


def test_gc_keeps_referenced_and_leased_blobs(tmp_path):
    root = DataRoot(tmp_path / "root")
    blobs = BlobStore(root)
    records = ImageRecords(Database(root.db_path), blobs)
    owned = blobs.put_bytes(b"owned")
    garbage = blobs.put_bytes(b"garbage" * 1000)
    lease = records.lease()
    leased = sha(b"leased")
    lease.add([leased])
    blobs.put_bytes(b"leased", leased)
    with records.db.transaction() as c:
        c.execute("INSERT INTO blob_refs VALUES ('soci:x', ?)", (owned,))
    result = records.gc()
    assert result.blobs_removed == 1 and result.bytes_freed == 7000
    assert blobs.has(owned) and blobs.has(leased) and not blobs.has(garbage)
    lease.release()
    assert records.gc().blobs_removed == 1
    assert not blobs.has(leased)


def test_gc_drops_leases_of_dead_processes(tmp_path):
    root = DataRoot(tmp_path / "root")
    blobs = BlobStore(root)
    records = ImageRecords(Database(root.db_path), blobs)
    d = blobs.put_bytes(b"from a crashed pull")
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    p.join()
    with records.db.transaction() as c:       # a lease left behind by a process that is gone
        c.execute("INSERT INTO leases VALUES ('dead', ?, ?)", (p.pid, time.time()))
        c.execute("INSERT INTO blob_refs VALUES ('lease:dead', ?)", (d,))
    assert records.gc().blobs_removed == 1
    with records.db.reading() as c:
        assert c.execute("SELECT count(*) FROM leases").fetchone()[0] == 0


def test_recover_drops_the_lease_of_a_process_that_ended_unreaped(tmp_path):
    """A process that ended but that its parent has not reaped yet (a zombie: an init that reaps
    late, a service that handed over to its successor mid-pull) holds no lease: the next pull's
    recovery drops it."""
    root = DataRoot(tmp_path / "root")
    blobs = BlobStore(root)
    records = ImageRecords(Database(root.db_path), blobs)
    d = blobs.put_bytes(b"from a pull cut short")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while open(f"/proc/{pid}/stat", "rb").read().rpartition(b")")[2].split()[0] != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with records.db.transaction() as c:
            c.execute("INSERT INTO leases VALUES ('ended', ?, ?)", (pid, time.time()))
            c.execute("INSERT INTO blob_refs VALUES ('lease:ended', ?)", (d,))
        records.recover()
        with records.db.reading() as c:
            assert c.execute("SELECT count(*) FROM leases").fetchone()[0] == 0
        assert not blobs.has(d)
    finally:
        os.waitpid(pid, 0)


def test_writer_verified_upstream_still_checks_size(store):
    data = b"x" * 1000
    with pytest.raises(IntegrityError, match="more than"):
        with store.writer(sha(data), 10, verified_upstream=True) as w:
            w.write(data)
    with pytest.raises(IntegrityError, match="got 5 bytes"):
        with store.writer(sha(data), 1000, verified_upstream=True) as w:
            w.write(data[:5])
    assert list(store.digests()) == [] and list(store.root.tmp.iterdir()) == []
