"""Container records in the SQLite database, and their true state.

A container's monitor process (see runtime/monitor.py) waits for the runtime and
writes the exit status (to `exit.json` in the container directory, then to the
database). The status shown is reconciled with reality on every read: a record
that says "running" whose monitor is gone (killed, or the host rebooted — the
boot ID is kept with the PID) is exited, with the code from `exit.json` if the
monitor got to write it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from lazyoci.errors import ContainerError
from lazyoci.proc_stat import stat_fields
from lazyoci.store.db import Database
from lazyoci.store.image_records import add_blob_owner, drop_blob_owner
from lazyoci.store.layout import DataRoot
from lazyoci.store.modes import private_dir, write_file

_DDL = """
CREATE TABLE IF NOT EXISTS containers (
    id TEXT PRIMARY KEY,             -- 64 hex
    name TEXT NOT NULL UNIQUE,
    image TEXT NOT NULL,             -- the reference the user gave (normalised)
    image_digest TEXT NOT NULL,      -- top-level digest of the image
    command TEXT NOT NULL,           -- JSON list: the process args
    created REAL NOT NULL,
    status TEXT NOT NULL,            -- created | running | exited
    exit_code INTEGER,
    finished REAL,
    monitor_pid INTEGER,
    monitor_start TEXT,              -- "<boot id>:<start ticks>" of the monitor, against PID reuse and reboots
    snapshotter TEXT NOT NULL,
    snapshot_key TEXT NOT NULL,
    runtime TEXT NOT NULL,
    auto_remove INTEGER NOT NULL DEFAULT 0,
    detached INTEGER NOT NULL DEFAULT 0
);
"""

_ADJECTIVES = ("admiring", "agitated", "amazing", "blissful", "bold", "brave", "busy", "clever",
               "cool", "dazzling", "eager", "ecstatic", "elegant", "epic", "festive", "focused",
               "friendly", "gallant", "gifted", "happy", "hopeful", "jolly", "keen", "kind", "lucid",
               "magical", "modest", "nifty", "nostalgic", "peaceful", "quirky", "relaxed", "serene",
               "sharp", "silly", "stoic", "sweet", "tender", "trusting", "upbeat", "vibrant", "zealous")
_NAMES = ("albattani", "archimedes", "babbage", "bell", "bohr", "curie", "darwin", "dijkstra",
          "einstein", "euler", "fermi", "feynman", "galileo", "goldberg", "hamilton", "hopper",
          "hypatia", "kepler", "knuth", "lamarr", "lovelace", "mccarthy", "meitner", "newton",
          "noether", "pascal", "ritchie", "shannon", "tesla", "thompson", "torvalds", "turing",
          "wozniak", "yonath")


@dataclass(frozen=True)
class ContainerRecord:
    id: str
    name: str
    image: str
    image_digest: str
    command: tuple[str, ...]
    created: float
    status: str
    exit_code: int | None
    finished: float | None
    snapshotter: str
    snapshot_key: str
    runtime: str
    auto_remove: bool
    detached: bool
    monitor_pid: int | None

    @property
    def short_id(self) -> str:
        return self.id[:12]


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def process_start(pid: int) -> str | None:
    """'<boot id>:<start time in ticks>' of a live process, None if it does not exist."""
    fields = stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return f"{boot_id()}:{fields[19]}"


def _generated_name(taken: set[str]) -> str:
    """docker's adjective_scientist, one not in `taken` (a random suffix once those run short)."""
    for _ in range(1000):
        name = f"{random.choice(_ADJECTIVES)}_{random.choice(_NAMES)}"
        if name not in taken:
            return name
    return f"container_{os.urandom(4).hex()}"


def _name_in_use(name: str, holder: str) -> str:
    """docker's conflict, in one line."""
    return (f"the container name {name!r} is already in use by container {holder[:12]}: "
            "remove (or rename) that container to reuse the name")


class ContainerStore:
    def __init__(self, root: DataRoot, db: Database | None = None) -> None:
        self.root = root
        self.db = db or Database(root.db_path)
        self.db.ensure_schema("containers", _DDL)

    def dir(self, container_id: str) -> Path:
        return self.root.containers / container_id

    def labels(self, container_id: str) -> dict[str, str]:
        """The container's `--label`s: the annotations of its runtime bundle ({} if it has none)."""
        try:
            spec = json.loads((self.dir(container_id) / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        labels = spec.get("annotations") if isinstance(spec, dict) else None
        return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}

    def make_dir(self, container_id: str) -> Path:
        """A new container's directory: its bundle, logs and the mount point of its root filesystem.

        Closed (0700, in the closed `containers/`): the mount keeps setuid binaries working for
        the container, so no other local user may reach them, nor the config and its `-e` secrets."""
        self.root.ensure()
        return private_dir(self.dir(container_id))

    def new_id_and_name(self, name: str | None) -> tuple[str, str]:
        """A new container ID and its name: the user's (refused now if malformed or taken, before any
        work is done for it) or a generated one free at this moment (`create` draws again if not)."""
        with self.db.reading() as c:
            taken = {r[0]: r[1] for r in c.execute("SELECT name, id FROM containers")}
        if name is not None:
            if not name or not all(ch.isalnum() or ch in "_.-" for ch in name) or not name[0].isalnum():
                raise ContainerError(f"invalid container name {name!r}: use [a-zA-Z0-9][a-zA-Z0-9_.-]*")
            if name in taken:
                raise ContainerError(_name_in_use(name, taken[name]))
        else:
            name = _generated_name(set(taken))
        return os.urandom(32).hex(), name

    def create(self, rec: ContainerRecord, name_given: bool) -> ContainerRecord:
        """Record a new container, under the name it came with unless another container took that
        name meanwhile: a generated name is then drawn again, as docker does, and a name the user
        gave is docker's conflict. The check and the insert are one write transaction."""
        with self.db.transaction() as c:
            taken = {r[0]: r[1] for r in c.execute("SELECT name, id FROM containers")}
            if rec.name in taken:
                if name_given:
                    raise ContainerError(_name_in_use(rec.name, taken[rec.name]))
                rec = dataclasses.replace(rec, name=_generated_name(set(taken)))
            c.execute("INSERT INTO containers (id, name, image, image_digest, command, created, status, "
                      "snapshotter, snapshot_key, runtime, auto_remove, detached) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (rec.id, rec.name, rec.image, rec.image_digest, json.dumps(list(rec.command)),
                       rec.created, rec.status, rec.snapshotter, rec.snapshot_key, rec.runtime,
                       int(rec.auto_remove), int(rec.detached)))
            # Hold the image: `rmi` refuses while a container uses it.
            add_blob_owner(c, f"container:{rec.id}", [rec.image_digest])
        return rec

    def set_running(self, container_id: str, monitor_pid: int, start: str | None) -> None:
        with self.db.transaction() as c:
            c.execute("UPDATE containers SET status='running', monitor_pid=?, monitor_start=? "
                      "WHERE id=? AND status='created'", (monitor_pid, start, container_id))

    def set_restartable(self, container_id: str) -> bool:
        """Turn an exited container back into a created one, for `start`; False if it is not exited
        (so two concurrent starts cannot both run it)."""
        with self.db.transaction() as c:
            cur = c.execute("UPDATE containers SET status='created', exit_code=NULL, finished=NULL, "
                            "monitor_pid=NULL, monitor_start=NULL, detached=1 "
                            "WHERE id=? AND status='exited'", (container_id,))
            return cur.rowcount == 1

    def set_exited(self, container_id: str, code: int | None) -> None:
        with self.db.transaction() as c:
            c.execute("UPDATE containers SET status='exited', exit_code=?, finished=? WHERE id=?",
                      (code, time.time(), container_id))

    def delete(self, container_id: str) -> None:
        with self.db.transaction() as c:
            c.execute("DELETE FROM containers WHERE id=?", (container_id,))
            drop_blob_owner(c, f"container:{container_id}")

    def read_exit_file(self, container_id: str) -> int | None:
        try:
            return int(json.loads((self.dir(container_id) / "exit.json").read_text())["code"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _reconcile(self, row: sqlite3.Row) -> ContainerRecord:
        status, code, finished = row["status"], row["exit_code"], row["finished"]
        if status in ("running", "created") and row["monitor_pid"]:
            alive = process_start(row["monitor_pid"]) == row["monitor_start"]
            if not alive:
                code = self.read_exit_file(row["id"])
                status, finished = "exited", time.time()
                self.set_exited(row["id"], code)
        return ContainerRecord(
            id=row["id"], name=row["name"], image=row["image"], image_digest=row["image_digest"],
            command=tuple(json.loads(row["command"])), created=row["created"], status=status,
            exit_code=code, finished=finished, snapshotter=row["snapshotter"],
            snapshot_key=row["snapshot_key"], runtime=row["runtime"],
            auto_remove=bool(row["auto_remove"]), detached=bool(row["detached"]),
            monitor_pid=row["monitor_pid"])

    def list(self) -> list[ContainerRecord]:
        with self.db.reading() as c:
            rows = c.execute("SELECT * FROM containers ORDER BY created DESC").fetchall()
        return [self._reconcile(r) for r in rows]

    def get(self, name_or_id: str) -> ContainerRecord:
        """By exact name, full ID or unique ID prefix."""
        with self.db.reading() as c:
            row = c.execute("SELECT * FROM containers WHERE name=? OR id=?", (name_or_id, name_or_id)).fetchone()
            if row is None and len(name_or_id) >= 3 and all(ch in "0123456789abcdef" for ch in name_or_id):
                rows = c.execute("SELECT * FROM containers WHERE id LIKE ?", (name_or_id + "%",)).fetchall()
                if len(rows) > 1:
                    raise ContainerError(f"container ID prefix {name_or_id!r} is ambiguous")
                row = rows[0] if rows else None
        if row is None:
            raise ContainerError(f"no such container: {name_or_id}")
        return self._reconcile(row)

    def try_get(self, container_id: str) -> ContainerRecord | None:
        try:
            return self.get(container_id)
        except ContainerError:
            return None


def write_exit_file(path: Path, code: int | None) -> None:
    write_file(path, json.dumps({"code": code, "finished": time.time()}).encode())
