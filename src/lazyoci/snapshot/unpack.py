"""Apply one layer tar to an empty directory, safely, while its bytes stream in.

The result is an overlayfs lower directory: OCI whiteouts become what the kernel
expects (`.wh.NAME` -> a 0:0 character device NAME, `.wh..wh..opq` -> the
`trusted.overlay.opaque=y` xattr on the directory; the rules are oci/whiteout.py's).

Safety: every path is resolved component by component from an open fd of the
layer directory with O_NOFOLLOW, and every create/link/chown uses `dir_fd`, so
no entry can reach outside the directory — not by `..`, not by an absolute
path, not through a symlink an earlier entry planted, not by a hardlink. Such
an entry raises UnsafeLayerError naming it; the caller removes the partial
directory. Nothing is ever resolved through a path string the layer controls.

The diff ID (sha256 of the uncompressed tar) and the tar's size are computed on
the way and returned: the pull records that size and never inflates the layer again.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from lazyoci.errors import FormatError, UnsafeLayerError
from lazyoci.oci.compression import decode_errors, open_decompressed
from lazyoci.oci.mediatypes import layer_compression
from lazyoci.oci.whiteout import OPAQUE_XATTR, is_opaque_marker, is_overlay_xattr, whiteout_target
from lazyoci.snapshot.inflating_reader import ChunkReader, ForwardFile, PrefetchReader
from lazyoci.tar.headers import TarHeader, iter_headers

if TYPE_CHECKING:
    import hashlib

_CHUNK = 1 << 20     # read/write granularity; also the zero-run (hole) unit
_MAX_ID = (1 << 32) - 2     # uid_t is 32 bits and (uid_t)-1 means "unchanged" to chown
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class UnpackedLayer:
    diff_id: str        # sha256 of the uncompressed tar
    size: int           # bytes of the uncompressed tar (SIZE in `images`)
    # the sha256 state after the last byte, for a caller that knows what the stream left out
    # (snapshot/cached_unpack.py: the zero padding after a cached tar's end blocks)
    sha: "hashlib._Hash" = field(compare=False, repr=False)


def _split(name: str, what: str) -> list[str]:
    """Path components of a tar name; UnsafeLayerError for absolute paths and `..`."""
    if name.startswith("/"):
        raise UnsafeLayerError(f"layer entry {what!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayerError(f"layer entry {what!r} contains '..'")
    return parts


class _Applier:
    """Applies tar members below one root fd; see the module docstring for the rules."""

    def __init__(self, dest: Path):
        self.root_fd = os.open(dest, _DIR_FLAGS)
        self._cache: dict[tuple[str, ...], int] = {}   # parent path -> open dir fd
        self._dir_times: list[tuple[tuple[str, ...], int]] = []

    def close(self) -> None:
        self._drop_cache()
        os.close(self.root_fd)

    def _drop_cache(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()

    def parent_fd(self, parts: list[str], entry: str, create: bool = True) -> int:
        """A cached fd of the directory holding parts[-1] (valid until the next call)."""
        key = tuple(parts[:-1])
        fd = self._cache.get(key)
        if fd is not None:
            return fd
        if len(self._cache) > 256:
            self._drop_cache()
        fd = self.walk(key, entry, create)
        if fd != self.root_fd:
            self._cache[key] = fd
        return fd

    def walk(self, key: tuple[str, ...], entry: str, create: bool) -> int:
        """Open the directory `key` component by component with O_NOFOLLOW (never through a symlink).

        Returns a new fd the caller owns, or root_fd for the empty path."""
        fd = self.root_fd
        opened: list[int] = []
        try:
            for comp in key:
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise FormatError(f"layer entry {entry!r}: {'/'.join(key)} does not exist") from None
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)     # an implied directory is 0755 whatever our umask
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.lstat(comp, dir_fd=fd)
                    if stat.S_ISLNK(st.st_mode):
                        raise UnsafeLayerError(
                            f"layer entry {entry!r} goes through the symlink {comp!r}") from None
                    raise FormatError(f"layer entry {entry!r}: {comp!r} is not a directory") from None
                opened.append(nfd)
                fd = nfd
        except BaseException:
            for o in opened:
                os.close(o)
            raise
        for o in opened[:-1]:
            os.close(o)
        return fd

    def _clear(self, pfd: int, parts: list[str], keep_dir: bool) -> bool:
        """Remove what exists at name (tar: the later entry wins). True if a dir was kept."""
        name = parts[-1]
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            gone = tuple(parts)
            for key in [k for k in self._cache if k[:len(gone)] == gone]:
                os.close(self._cache.pop(key))  # fds of directories being removed
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)
        return False

    def apply(self, f: ForwardFile, m: TarHeader) -> None:
        name, kind = _entry_name(m), m.type
        if not (0 <= m.uid <= _MAX_ID and 0 <= m.gid <= _MAX_ID):
            raise FormatError(f"layer entry {name!r} has a uid or gid out of range ({m.uid}:{m.gid})")
        parts = _split(name, name)
        if not parts:  # the layer root itself ("./")
            if kind == "dir":
                self._meta_fd(self.root_fd, m)
                self._dir_times.append(((), m.mtime_ns))
            return
        base = parts[-1]
        if is_opaque_marker(base):
            pfd = self.parent_fd(parts, name)
            os.setxattr(pfd, OPAQUE_XATTR, b"y")
            return
        pfd = self.parent_fd(parts, name)
        target = whiteout_target(base)
        if target is not None:
            if not target or target in (".", ".."):
                raise UnsafeLayerError(f"layer entry {name!r} is a malformed whiteout")
            self._clear(pfd, parts[:-1] + [target], keep_dir=False)
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
            os.chown(target, 0, 0, dir_fd=pfd, follow_symlinks=False)
            return
        if kind == "dir":
            if not self._clear(pfd, parts, keep_dir=True):
                os.mkdir(base, 0o700, dir_fd=pfd)
            fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
            try:
                self._meta_fd(fd, m)
            finally:
                os.close(fd)
            self._dir_times.append((tuple(parts), m.mtime_ns))
        elif kind in ("reg", "contiguous"):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(base, flags, 0o600, dir_fd=pfd)
            except FileExistsError:  # a later entry wins: replace (never write through) what is there
                self._clear(pfd, parts, keep_dir=False)
                fd = os.open(base, flags, 0o600, dir_fd=pfd)
            try:
                _copy_range(f, m.offset, m.size, fd)
                self._meta_fd(fd, m)
                os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
            finally:
                os.close(fd)
        elif kind == "symlink":
            self._clear(pfd, parts, keep_dir=False)
            os.symlink(m.link, base, dir_fd=pfd)
            os.chown(base, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            self._xattrs_path(f"/proc/self/fd/{pfd}/{base}", m)
            os.utime(base, ns=(m.mtime_ns, m.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        elif kind == "hardlink":
            tparts = _split(m.link, name)
            if not tparts:
                raise UnsafeLayerError(f"layer entry {name!r} links to the layer root")
            if tparts == parts:
                return
            self._clear(pfd, parts, keep_dir=False)
            # Own fds for both ends: cached ones may be evicted between the two walks.
            tpfd = self.walk(tuple(tparts[:-1]), name, create=False)
            dpfd = self.walk(tuple(parts[:-1]), name, create=True)
            try:
                try:
                    tst = os.lstat(tparts[-1], dir_fd=tpfd)
                except FileNotFoundError:
                    raise FormatError(f"layer entry {name!r}: link target {m.link!r} missing") from None
                if stat.S_ISDIR(tst.st_mode):
                    raise FormatError(f"layer entry {name!r}: hardlink to a directory")
                os.link(tparts[-1], base, src_dir_fd=tpfd, dst_dir_fd=dpfd, follow_symlinks=False)
            finally:
                for fd in (tpfd, dpfd):
                    if fd != self.root_fd:
                        os.close(fd)
        elif kind == "char" or kind == "block" or kind == "fifo":
            self._clear(pfd, parts, keep_dir=False)
            node = stat.S_IFCHR if kind == "char" else stat.S_IFBLK if kind == "block" else stat.S_IFIFO
            dev = os.makedev(m.devmajor, m.devminor) if kind != "fifo" else 0
            os.mknod(base, node | 0o600, dev, dir_fd=pfd)
            # Opened with O_PATH so that nothing (a fifo's open, a device) is triggered.
            fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                path = f"/proc/self/fd/{fd}"
                os.chown(path, m.uid, m.gid)
                os.chmod(path, _mode(m))
                self._xattrs_path(path, m)
                os.utime(path, ns=(m.mtime_ns, m.mtime_ns))
            finally:
                os.close(fd)
        else:
            raise FormatError(f"layer entry {name!r} has an unsupported type {m.type!r}")

    def _meta_fd(self, fd: int, m: TarHeader) -> None:
        # chown first: it clears setuid/setgid bits and security.capability.
        os.chown(fd, m.uid, m.gid)
        os.chmod(fd, _mode(m))
        for key, value in _xattrs(m):
            try:
                os.setxattr(fd, key, value)
            except OSError as e:
                raise _xattr_error(m, key, value, e) from None

    def _xattrs_path(self, path: str, m: TarHeader) -> None:
        for key, value in _xattrs(m):
            try:
                os.setxattr(path, key, value, follow_symlinks=False)
            except OSError as e:
                # user.* xattrs are not allowed on symlinks and device nodes (EPERM).
                if not (e.errno == errno.EPERM and key.startswith("user.")):
                    raise _xattr_error(m, key, value, e) from None

    def finish(self) -> None:
        """Set directory times last (deepest first): creating entries changed them."""
        self._drop_cache()
        for parts, ns in reversed(self._dir_times):
            if not parts:
                os.utime(self.root_fd, ns=(ns, ns))
                continue
            try:
                fd = self.walk(parts, "/".join(parts), create=False)
            except (FormatError, FileNotFoundError):
                continue  # replaced or removed by a later entry
            try:
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)
        self._drop_cache()


def _entry_name(m: TarHeader) -> str:
    """The entry's name as errors show it (a directory without its trailing slash)."""
    return m.path.rstrip("/") if m.type == "dir" else m.path


def _mode(m: TarHeader) -> int:
    return m.mode & 0o7777


def _xattr_error(m: TarHeader, key: str, value: bytes, e: OSError) -> OSError | FormatError:
    """An xattr the kernel refuses fails the unpack, as docker's does: the layer directory would
    otherwise differ from its tar (a binary without its capabilities behaves differently).
    A full disk stays an OSError for the caller's disk-space handling."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return e
    return FormatError(f"layer entry {_entry_name(m)!r}: cannot set its xattr {key} ({len(value)} bytes): "
                       f"{e.strerror or e}")


def _xattrs(m: TarHeader) -> list[tuple[str, bytes]]:
    # a layer must not forge overlay whiteouts/opaque markers
    return [(name, value) for name, value in m.xattrs().items() if not is_overlay_xattr(name)]


_ZEROS = bytes(_CHUNK)


def _write_all(fd: int, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy_range(f: "ForwardFile", offset: int, size: int, fd: int) -> None:
    """TarHeader data straight from the stream to fd.

    Runs of zero chunks become holes (lseek instead of write): same content, and
    huge zero-filled files (disk images, preallocated data) cost no disk."""
    f.seek(offset)
    total = size
    hole = False
    while size > 0:
        chunk = f.read(min(size, _CHUNK))
        if not chunk:
            raise FormatError("invalid layer tar: truncated file data")
        size -= len(chunk)
        if len(chunk) == _CHUNK and chunk == _ZEROS:
            os.lseek(fd, len(chunk), os.SEEK_CUR)
            hole = True
        else:
            _write_all(fd, chunk)
    if hole:
        os.ftruncate(fd, total)


def apply_layer_stream(source: Iterable[bytes] | BinaryIO | bytes, media_type: str,
                       dest: Path) -> UnpackedLayer:
    """Unpack a layer (compressed as its media type says) into the empty directory dest.

    Returns its diff ID and uncompressed size. Raises FormatError for an unknown media type or a bad
    tar, UnsafeLayerError for an escaping entry; dest is then left partial and the
    caller removes it (nothing outside dest was touched).
    """
    compression = layer_compression(media_type)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    raw: BinaryIO = source if hasattr(source, "read") else ChunkReader(source)  # type: ignore[assignment]
    try:
        stream = open_decompressed(raw, compression)
    except Exception as e:  # zstandard / isal raise their own types on bad headers
        raise FormatError(f"cannot decompress layer: {e}") from None
    hashing = PrefetchReader(stream, _CHUNK)
    applier = _Applier(dest)
    try:
        try:
            forward = ForwardFile(hashing)
            for member in iter_headers(forward):
                applier.apply(forward, member)
            forward.drain()  # the end-of-archive blocks and padding are part of the diff ID
        except (EOFError, OSError, ValueError) as e:
            if isinstance(e, OSError) and e.errno not in (None, 0) and not _is_decode_error(e):
                raise
            raise FormatError(f"invalid layer tar: {e}") from None
        except Exception as e:
            if _is_decode_error(e):
                raise FormatError(f"cannot decompress layer: {e}") from None
            raise
        applier.finish()
    finally:
        applier.close()
        hashing.close()
    return UnpackedLayer("sha256:" + hashing.sha.hexdigest(), hashing.size, hashing.sha.copy())


def _is_decode_error(e: BaseException) -> bool:
    return isinstance(e, decode_errors())


def remove_tree(path: Path) -> None:
    """Remove a (partial) layer directory; tolerate it being gone."""
    shutil.rmtree(path, ignore_errors=True)
