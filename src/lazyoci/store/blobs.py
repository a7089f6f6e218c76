"""Content-addressed blobs: ``<root>/blobs/sha256/<hex>``, never visible unless verified.

A write goes to a temporary file under ``<root>/tmp`` (same filesystem), is
fsync'd, checked against its size and digest, and only then renamed into place.
A crash or Ctrl-C leaves at most a temporary file, which carries an flock while
its writer lives and its writer's pid in its name (``<hex16>.<pid>.<random>.part``);
`clean_tmp` removes the ones whose writer is gone: unlocked, and either their
writer has exited or they are older than the moment between create and lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from lazyoci.errors import IntegrityError, StoreError
from lazyoci.oci.digest import Digest, DigestVerifier, verify_bytes
from lazyoci.proc_stat import running
from lazyoci.store.layout import DataRoot

if TYPE_CHECKING:
    from lazyoci.oci.manifest import Index

_BUFFER = 1 << 20


def _os_error(e: OSError, what: str) -> StoreError:
    if e.errno == errno.ENOSPC:
        return StoreError(f"disk full while writing {what}")
    return StoreError(f"cannot write {what}: {e.strerror or e}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobWriter:
    """Receives a blob's bytes; `commit` verifies and publishes it, `abort` throws it away.

    With `expected` None the digest is computed (for content whose digest is not
    known in advance, e.g. a layer being built).
    """

    def __init__(self, store: "BlobStore", expected: str | None, size: int | None,
                 verified_upstream: bool = False) -> None:
        self._store = store
        self.expected = str(Digest.parse(expected)) if expected else None
        self.size = size
        # Without an expected digest we only hash and count; `commit` names the result.
        # `verified_upstream`: the bytes come from an iterator that checks this very digest and
        # raises before it ends (RegistryClient.iter_blob), so hashing twice would only halve
        # the speed; the caller commits only after that iterator finished.
        self._verifier = DigestVerifier(self.expected, size) if self.expected and not verified_upstream else None
        self._hash = hashlib.sha256()        # fed only when no digest is expected
        self._count = 0
        self.digest: str | None = None
        label = Digest.parse(expected).hex[:16] if expected else "new"
        try:
            fd, name = tempfile.mkstemp(dir=store.root.tmp, prefix=f"{label}.{os.getpid()}.", suffix=".part")
        except OSError as e:
            raise _os_error(e, "a temporary blob") from None
        # The lock tells `clean_tmp` in other processes that this file is alive.
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.tmp_path = Path(name)
        self._file = os.fdopen(fd, "wb", buffering=_BUFFER)
        self._closed = False

    @property
    def count(self) -> int:
        return self._count

    def write(self, chunk: bytes) -> None:
        if self._verifier is not None:
            self._verifier.update(chunk)     # raises on more bytes than expected
        elif self.expected is None:
            self._hash.update(chunk)
        self._count += len(chunk)
        if self.size is not None and self._count > self.size:
            raise IntegrityError(f"blob {self.expected}: more than the expected {self.size} bytes",
                                 expected=self.expected)
        try:
            self._file.write(chunk)
        except OSError as e:
            raise _os_error(e, f"blob {self.expected or ''}".strip()) from None

    def commit(self) -> str:
        """Verify and atomically publish; return the digest. Aborts (and raises) on mismatch."""
        try:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as e:
                raise _os_error(e, f"blob {self.expected or ''}".strip()) from None
            if self.expected is not None:
                if self._verifier is not None:
                    self._verifier.finish()
                elif self.size is not None and self._count != self.size:   # verified upstream: check the size
                    raise IntegrityError(f"blob {self.expected}: got {self._count} bytes, expected {self.size}",
                                         expected=self.expected)
                digest = self.expected
            else:
                if self.size is not None and self._count != self.size:
                    raise IntegrityError(f"blob: got {self._count} bytes, expected {self.size}")
                digest = "sha256:" + self._hash.hexdigest()
            final = self._store.path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            # Same content, same name: replacing a blob another process just wrote is harmless.
            os.replace(self.tmp_path, final)
            _fsync_dir(final.parent)
        except BaseException:
            self.abort()
            raise
        self._close()
        self.digest = digest
        return digest

    def abort(self) -> None:
        """Remove the temporary file (idempotent)."""
        self._close()
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._file.close()
            except OSError:
                pass

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self.digest is None:
                self.commit()
        else:
            self.abort()


class BlobStore:
    def __init__(self, root: DataRoot) -> None:
        self.root = root.ensure()

    def path(self, digest: str) -> Path:
        d = Digest.parse(digest)
        return self.root.blobs / d.algorithm / d.hex

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def has_index_content(self, index: "Index") -> bool:
        """Is every manifest of `index`, and each one's config and layers, stored here?

        Save and push hand on the whole index only then; otherwise just the pulled platform.
        """
        from lazyoci.oci import mediatypes as mt
        from lazyoci.oci.manifest import Manifest

        for d in index.manifests:
            if not self.has(d.digest):
                return False
            if d.media_type in mt.IMAGE_MANIFESTS:
                m = Manifest.parse(self.read(d.digest), d.media_type)
                if not all(self.has(b.digest) for b in (m.config, *m.layers)):
                    return False
        return True

    def size(self, digest: str) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is not in the local store") from None

    def read(self, digest: str) -> bytes:
        """The whole blob, re-verified (used for manifests and configs, which are small)."""
        with self.open(digest) as f:
            data = f.read()
        try:
            verify_bytes(data, digest, "stored blob")
        except IntegrityError as e:
            raise IntegrityError(f"local store is corrupt: {e}", e.expected, e.actual) from None
        return data

    def writer(self, digest: str | None, size: int | None = None, verified_upstream: bool = False) -> BlobWriter:
        return BlobWriter(self, digest, size, verified_upstream)

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        """Store `data` (verified against `expected` when given); return its digest."""
        with self.writer(expected, len(data) if expected else None) as w:
            w.write(data)
            return w.commit()

    def delete(self, digest: str) -> None:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            pass

    def digests(self) -> Iterator[str]:
        """Every blob on disk."""
        for algo_dir in self.root.blobs.iterdir() if self.root.blobs.is_dir() else ():
            for f in algo_dir.iterdir():
                yield f"{algo_dir.name}:{f.name}"

    def clean_tmp(self, min_age: float = 2.0) -> int:
        """Remove temporary files whose writer has died (no flock held); return how many.

        A file is only unlocked without a dead writer for the moment between its
        creation and its lock, so an unlocked file is stale if the pid in its name
        has exited, or else once it is `min_age` old."""
        removed = 0
        now = time.time()
        for f in self.root.tmp.iterdir():
            try:
                if not _writer_exited(f.name) and now - f.stat().st_mtime < min_age:
                    continue        # its writer may not hold the lock yet
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                f.unlink()
                removed += 1
            except (BlockingIOError, FileNotFoundError):
                pass                # a live writer, or another cleaner was first
            finally:
                os.close(fd)
        return removed


def _writer_exited(name: str) -> bool:
    """Has the process named in a temporary file's name (``<hex16>.<pid>.<random>.part``) exited?

    False when the name carries no pid. A zombie has exited: its locks are gone."""
    parts = name.split(".")
    if len(parts) != 4 or not parts[1].isascii() or not parts[1].isdigit():
        return False
    return not running(int(parts[1]))
