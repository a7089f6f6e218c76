"""Image records: names → top-level digests, what each image holds, and blob garbage collection.

Blob ownership is one generic table, ``blob_refs(owner, digest)``: an image owns
its blobs as ``image:<top digest>``; other areas add their own owners (a SOCI
index as ``soci:<digest>``, a container as ``container:<id>`` on an image's top
digest, which makes plain `rmi` refuse). A blob on disk that no owner names is
garbage. An operation in flight holds a *lease* (``lease:<id>``) on every blob
before it checks or writes it, so a concurrent `gc` in another process never
deletes a blob that is about to be used; leases of dead processes are dropped.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazyoci.proc_stat import running
from lazyoci.store.db import Database

if TYPE_CHECKING:   # annotations only: `ps` and `rm` reach this module and need neither
    from lazyoci.oci.platform import Platform
    from lazyoci.store.blobs import BlobStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS image_names (
    name TEXT PRIMARY KEY,            -- normalised reference: registry/repo:tag or registry/repo@digest
    digest TEXT NOT NULL,             -- top-level digest (index or manifest)
    created REAL NOT NULL             -- when the name was last pointed at `digest`
);
CREATE INDEX IF NOT EXISTS image_names_digest ON image_names(digest);
CREATE TABLE IF NOT EXISTS image_contents (
    digest TEXT PRIMARY KEY,          -- top-level digest
    media_type TEXT NOT NULL,
    snapshotter TEXT NOT NULL,        -- overlayfs | soci: how its layers are prepared
    created REAL NOT NULL             -- when it was first stored here
);
CREATE TABLE IF NOT EXISTS image_platforms (
    top TEXT NOT NULL REFERENCES image_contents(digest) ON DELETE CASCADE,
    manifest TEXT NOT NULL,           -- a platform manifest available locally
    platform TEXT NOT NULL,           -- os/arch[/variant]
    config TEXT NOT NULL,
    PRIMARY KEY (top, manifest)
);
CREATE TABLE IF NOT EXISTS blob_refs (
    owner TEXT NOT NULL,              -- image:<top> | lease:<id> | soci:<digest> | container:<id> ...
    digest TEXT NOT NULL,
    PRIMARY KEY (owner, digest)
);
CREATE INDEX IF NOT EXISTS blob_refs_digest ON blob_refs(digest);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS blob_sources (   -- where a blob came from, for cross-repository mounts
    digest TEXT NOT NULL,
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    PRIMARY KEY (digest, registry, repository)
);
CREATE TABLE IF NOT EXISTS layer_sizes (    -- uncompressed size of a layer blob, for SIZE
    digest TEXT PRIMARY KEY,
    uncompressed INTEGER NOT NULL
);
"""

# A lease older than this is dropped even if its pid is alive (pid reuse).
LEASE_MAX_AGE = 24 * 3600.0


@dataclass(frozen=True)
class NameRecord:
    name: str
    digest: str
    created: float


@dataclass(frozen=True)
class ContentRecord:
    digest: str
    media_type: str
    snapshotter: str
    created: float
    platforms: tuple[tuple[str, str, str], ...]   # (manifest digest, platform, config digest)


@dataclass(frozen=True)
class GcResult:
    blobs_removed: int
    bytes_freed: int


class Lease:
    """Protects blobs from `gc` while an operation runs; `release` once the records are written."""

    def __init__(self, db: Database, blobs: BlobStore | None = None) -> None:
        self.db = db
        self.blobs = blobs
        self._digests: set[str] = set()
        self.id = uuid.uuid4().hex
        self.owner = f"lease:{self.id}"
        with db.transaction() as c:
            c.execute("INSERT INTO leases VALUES (?, ?, ?)", (self.id, os.getpid(), time.time()))

    def add(self, digests: Iterable[str]) -> None:
        digests = list(digests)
        self._digests.update(digests)
        with self.db.transaction() as c:
            c.executemany("INSERT OR IGNORE INTO blob_refs VALUES (?, ?)",
                          [(self.owner, d) for d in digests])

    def release(self) -> None:
        with self.db.transaction() as c:
            c.execute("DELETE FROM blob_refs WHERE owner=?", (self.owner,))
            c.execute("DELETE FROM leases WHERE id=?", (self.id,))

    def discard(self) -> None:
        """After a failure: delete the blobs this lease covered that nothing else owns (no orphans)."""
        if self.blobs is None:
            return
        with self.db.transaction() as c:
            for d in self._digests:
                if not c.execute("SELECT 1 FROM blob_refs WHERE digest=? AND owner!=? LIMIT 1",
                                 (d, self.owner)).fetchone():
                    self.blobs.delete(d)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self.discard()
        finally:
            self.release()


def add_blob_owner(c: sqlite3.Connection, owner: str, digests: Iterable[str]) -> None:
    """Inside a transaction: `owner` (``soci:<digest>``, ``container:<id>`` ...) holds these blobs."""
    c.executemany("INSERT OR IGNORE INTO blob_refs (owner, digest) VALUES (?, ?)", [(owner, d) for d in digests])


def drop_blob_owner(c: sqlite3.Connection, owner: str) -> None:
    """Inside a transaction: `owner` holds no blob any more (gc may take them)."""
    c.execute("DELETE FROM blob_refs WHERE owner=?", (owner,))


def blobs_held_by_kind(c: sqlite3.Connection, kind: str) -> set[str]:
    """The blobs held by owners of one kind (``container``: every ``container:<id>``)."""
    prefix = kind + ":"
    return {r[0] for r in c.execute("SELECT DISTINCT digest FROM blob_refs WHERE substr(owner, 1, ?) = ?",
                                    (len(prefix), prefix))}


class ImageRecords:
    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self.db = db
        self.blobs = blobs
        db.ensure_schema("images", SCHEMA)

    def lease(self) -> Lease:
        return Lease(self.db, self.blobs)

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """One transaction for a writer outside this module that records content and names it together."""
        return self.db.transaction()

    # --- writing -------------------------------------------------------------------------

    def record_content(self, c: sqlite3.Connection, top: str, media_type: str, snapshotter: str,
                       platforms: Iterable[tuple[str, Platform, str]], blobs: Iterable[str]) -> None:
        """Inside a transaction: the image `top` is stored, with these platform manifests and blobs."""
        c.execute("INSERT INTO image_contents VALUES (?, ?, ?, ?) ON CONFLICT(digest) DO UPDATE "
                  "SET snapshotter=excluded.snapshotter", (top, media_type, snapshotter, time.time()))
        c.executemany("INSERT OR REPLACE INTO image_platforms VALUES (?, ?, ?, ?)",
                      [(top, m, str(p), cfg) for m, p, cfg in platforms])
        c.executemany("INSERT OR IGNORE INTO blob_refs VALUES (?, ?)",
                      [(f"image:{top}", d) for d in set(blobs) | {top}])

    def set_name(self, c: sqlite3.Connection, name: str, top: str) -> str | None:
        """Point `name` at `top`; return the digest it pointed at before (to be released)."""
        row = c.execute("SELECT digest FROM image_names WHERE name=?", (name,)).fetchone()
        c.execute("INSERT OR REPLACE INTO image_names VALUES (?, ?, ?)", (name, top, time.time()))
        return row[0] if row and row[0] != top else None

    def point_name(self, c: sqlite3.Connection, name: str, top: str) -> bool:
        """Point `name` at `top`, releasing what it named before if nothing else names it.

        Returns True when content was released: the caller runs `gc()` after its transaction
        so that the old image's blobs do not stay behind as orphans.
        """
        previous = self.set_name(c, name, top)
        return previous is not None and self.release_if_unnamed(c, previous)

    def record_sources(self, c: sqlite3.Connection, registry: str, repository: str,
                       digests: Iterable[str]) -> None:
        c.executemany("INSERT OR IGNORE INTO blob_sources VALUES (?, ?, ?)",
                      [(d, registry, repository) for d in digests])

    def add_owner(self, owner: str, digests: Iterable[str]) -> None:
        """`owner` (``soci:<index digest>`` ...) holds these blobs against garbage collection."""
        with self.db.transaction() as c:
            add_blob_owner(c, owner, digests)

    def owners_of_kind(self, kind: str) -> list[str]:
        """The owners of one kind (``layer-index``: every ``layer-index:<layer digest>``)."""
        prefix = kind + ":"
        with self.db.reading() as c:
            return [r[0] for r in c.execute("SELECT DISTINCT owner FROM blob_refs WHERE substr(owner, 1, ?) = ?",
                                            (len(prefix), prefix))]

    def drop_owner(self, owner: str) -> None:
        """`owner` holds no blob any more (gc may take those no one else holds)."""
        with self.db.transaction() as c:
            drop_blob_owner(c, owner)

    def record_layer_size(self, digest: str, uncompressed: int) -> None:
        with self.db.transaction() as c:
            c.execute("INSERT OR REPLACE INTO layer_sizes VALUES (?, ?)", (digest, uncompressed))

    def drop_name(self, c: sqlite3.Connection, name: str) -> str | None:
        row = c.execute("SELECT digest FROM image_names WHERE name=?", (name,)).fetchone()
        if row is None:
            return None
        c.execute("DELETE FROM image_names WHERE name=?", (name,))
        return row[0]

    def other_holders(self, c: sqlite3.Connection, top: str) -> list[str]:
        """Owners other than images and leases that hold the image's top digest (e.g. containers)."""
        rows = c.execute("SELECT owner FROM blob_refs WHERE digest=? AND owner NOT LIKE 'image:%' "
                         "AND owner NOT LIKE 'lease:%'", (top,)).fetchall()
        return [r[0] for r in rows]

    def release_if_unnamed(self, c: sqlite3.Connection, top: str) -> bool:
        """Forget the content of `top` if no name points at it and nothing else holds it."""
        if c.execute("SELECT 1 FROM image_names WHERE digest=? LIMIT 1", (top,)).fetchone():
            return False
        if self.other_holders(c, top):
            return False
        c.execute("DELETE FROM image_contents WHERE digest=?", (top,))
        c.execute("DELETE FROM blob_refs WHERE owner=?", (f"image:{top}",))
        return True

    # --- reading -------------------------------------------------------------------------

    def names(self) -> list[NameRecord]:
        with self.db.reading() as c:
            return [NameRecord(r[0], r[1], r[2])
                    for r in c.execute("SELECT name, digest, created FROM image_names ORDER BY name")]

    def lookup_name(self, name: str) -> str | None:
        with self.db.reading() as c:
            row = c.execute("SELECT digest FROM image_names WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def owned_by(self, owner: str) -> list[str]:
        """The blobs `owner` holds (``image:<top>`` for an image's)."""
        with self.db.reading() as c:
            return [r[0] for r in c.execute("SELECT digest FROM blob_refs WHERE owner=?", (owner,))]

    def held_by_other(self, c: sqlite3.Connection, digest: str, owner: str) -> bool:
        """Inside a transaction: whether an owner other than `owner` holds `digest`."""
        return c.execute("SELECT 1 FROM blob_refs WHERE digest=? AND owner!=? LIMIT 1",
                         (digest, owner)).fetchone() is not None

    def names_in(self, c: sqlite3.Connection, top: str) -> list[str]:
        """Inside a transaction: the names pointing at `top`."""
        return [r[0] for r in c.execute("SELECT name FROM image_names WHERE digest=?", (top,))]

    def named_manifests(self) -> tuple[set[tuple[str, str]], set[str]]:
        """(name, platform manifest) pairs a name holds, and every platform manifest stored."""
        with self.db.reading() as c:
            held = {(r[0], r[1]) for r in c.execute(
                "SELECT n.name, p.manifest FROM image_names n JOIN image_platforms p ON p.top = n.digest")}
            present = {r[0] for r in c.execute("SELECT manifest FROM image_platforms")}
        return held, present

    def names_of(self, top: str) -> list[str]:
        with self.db.reading() as c:
            return [r[0] for r in c.execute("SELECT name FROM image_names WHERE digest=? ORDER BY name",
                                            (top,))]

    def contents(self) -> list[ContentRecord]:
        with self.db.reading() as c:
            tops = c.execute("SELECT digest, media_type, snapshotter, created FROM image_contents "
                             "ORDER BY created").fetchall()
            out = []
            for t in tops:
                plats = c.execute("SELECT manifest, platform, config FROM image_platforms WHERE top=? "
                                  "ORDER BY platform", (t[0],)).fetchall()
                out.append(ContentRecord(t[0], t[1], t[2], t[3], tuple(tuple(p) for p in plats)))
            return out

    def content(self, top: str) -> ContentRecord | None:
        for rec in self.contents():
            if rec.digest == top:
                return rec
        return None

    def find_by_prefix(self, prefix: str) -> list[str]:
        """Top-level digests starting with `prefix` (an IMAGE ID, with or without ``sha256:``)."""
        if not prefix.startswith("sha256:"):
            prefix = "sha256:" + prefix
        with self.db.reading() as c:
            return [r[0] for r in c.execute(
                "SELECT digest FROM image_contents WHERE substr(digest, 1, ?) = ?",
                (len(prefix), prefix))]

    def sources(self, digest: str) -> list[tuple[str, str]]:
        with self.db.reading() as c:
            return [(r[0], r[1]) for r in c.execute(
                "SELECT registry, repository FROM blob_sources WHERE digest=?", (digest,))]

    def layer_sizes(self, digests: Iterable[str]) -> dict[str, int]:
        ds = list(digests)
        with self.db.reading() as c:
            return {r[0]: r[1] for r in c.execute(
                f"SELECT digest, uncompressed FROM layer_sizes WHERE digest IN ({','.join('?' * len(ds))})",
                ds)} if ds else {}

    # --- crash recovery and garbage collection --------------------------------------------

    def _drop_dead_leases(self, c: sqlite3.Connection) -> list[str]:
        """Forget leases of processes that died; return the digests they alone covered."""
        alone: list[str] = []
        now = time.time()
        for lid, pid, created in c.execute("SELECT id, pid, created FROM leases").fetchall():
            if running(pid) and now - created <= LEASE_MAX_AGE:
                continue
            owner = f"lease:{lid}"
            alone += [r[0] for r in c.execute(
                "SELECT digest FROM blob_refs r WHERE owner=? AND NOT EXISTS "
                "(SELECT 1 FROM blob_refs o WHERE o.digest = r.digest AND o.owner != ?)", (owner, owner))]
            c.execute("DELETE FROM blob_refs WHERE owner=?", (owner,))
            c.execute("DELETE FROM leases WHERE id=?", (lid,))
        return alone

    def recover(self) -> None:
        """Undo what a killed process left: its leases, the blobs only they covered, its temp files.

        Cheap enough to run at the start of every pull, load and import.
        """
        with self.db.transaction() as c:
            for d in self._drop_dead_leases(c):
                self.blobs.delete(d)
        self.blobs.clean_tmp()

    def gc(self) -> GcResult:
        """Delete every blob no owner references (dropping leases of dead processes first).

        Runs inside one write transaction, so no other process can take a lease
        between reading the references and deleting the files.
        """
        removed = freed = 0
        with self.db.transaction() as c:
            self._drop_dead_leases(c)
            referenced = {r[0] for r in c.execute("SELECT DISTINCT digest FROM blob_refs")}
            for d in list(self.blobs.digests()):
                if d in referenced:
                    continue
                size = self.blobs.size(d) or 0
                self.blobs.delete(d)
                removed += 1
                freed += size
            c.execute("DELETE FROM blob_sources WHERE digest NOT IN (SELECT digest FROM blob_refs)")
            c.execute("DELETE FROM layer_sizes WHERE digest NOT IN (SELECT digest FROM blob_refs)")
        self.blobs.clean_tmp()
        return GcResult(removed, freed)
