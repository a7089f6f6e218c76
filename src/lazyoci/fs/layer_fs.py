"""The lazy layer filesystem: ONE FUSE session, each lazy layer a top-level directory.

pyfuse3 allows one FUSE session per process, so the service serves a single
filesystem at <root>/service/mnt and shows every lazy layer as the directory
`<layer digest hex>-<first 16 hex of its zTOC digest>`: two indexes of one layer
never share a view. Overlay lowerdirs point at those directories. The same session
also answers for the plain mount (<root>/service/mnt-plain), whose root (node ID
PLAIN_ROOT here) shows only the layers with no xattr and no opaque directory: the
kernel asks that mount for no xattr at all (service/session_holder.py), where overlayfs
asks the other for up to four on every file and directory it looks up.

Nothing of the layer's index (a zTOC) is served before it is checked against the
tar header it describes (fs/header_check.py): the kernel reaches a node only through LOOKUP
(or READDIRPLUS), so a lookup checks the node, its hardlink target, its opaque
markers and every directory above it first; getattr, readlink, xattrs, open and
read check too. A node that fails is EIO. READDIRPLUS hands the kernel the
attributes of unchecked children with zero timeouts, so it asks again (LOOKUP,
GETATTR) before anything uses them: a directory listing's names and types are
the index's, what a name then resolves to is checked.

Inode numbers: the mount root is 1; node n of the layer in slot s is
(s << 32) | (n + 1), with hardlinks answering their target's number. A tree's node
numbers follow from its index alone and the service keeps each view's slot
(service/view_slots.py), so a restarted service that takes the mount over answers
the node IDs and file handles (fh = inode) the kernel holds. Content is
immutable, so entries and attributes get long timeouts, so do the names a layer
does not have (negative entries), and reads keep the kernel page cache. What the
kernel asks again and again is decoded once per node: that it passed its header
check, its attributes, a file's extent in the tar. Reads whose spans are all in
the disk cache are served on the event loop (a pread; a thread hop would cost
more than the read); the others run
the span manager in worker threads (`trio.to_thread.run_sync`) so many reads
proceed at once; every lazyoci error (a digest mismatch above all) becomes EIO
and is logged. A node that passed its header check has its LOOKUP answer written into
the layer's read map, and a file where its bytes lie: its LOOKUPs, the GETXATTRs of its
opaque marker and the READs of its cached spans that reads touched before, the FUSE
session holder answers itself (service/holder_reads.py). So that it answers most
LOOKUPs of a directory, the first name looked up in it has the service check every
child whose header is cached (`_sweep`), and a later one again if the cache has grown since.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

import pyfuse3
import trio

from lazyoci.errors import LazyociError
from lazyoci.fs import tree as T
from lazyoci.fs.header_check import UNCHECKED, LayerVerifier
from lazyoci.fs.sibling_headers import SiblingHeaders
from lazyoci.fs.span_fetcher import SpanFetcher
from lazyoci.fs.tree import LayerTree
from lazyoci.oci.whiteout import OPAQUE_XATTR, OVERLAY_XATTR_PREFIX, is_overlay_xattr
# the node ID layout and the read map the session holder reads too
from lazyoci.service.holder_reads import OPAQUE, PLAIN_ROOT, SLOT_SHIFT, ReadMap, entry_out
from lazyoci.service.paths import layer_view_name as view_name

log = logging.getLogger(__name__)

TIMEOUT = 24 * 3600.0            # immutable content: cache entries and attributes for long
SWEEP_CHILDREN = 4096            # a directory with more children is not swept (`_sweep`)
SWEEPS = 4                       # times a directory is swept at most
MEMO_NODES = 1 << 16             # per layer: nodes whose attributes or file extent are kept decoded
_TYPE_BITS = {T.DIR: stat.S_IFDIR, T.REG: stat.S_IFREG, T.SYMLINK: stat.S_IFLNK,
              T.CHAR: stat.S_IFCHR, T.BLOCK: stat.S_IFBLK, T.FIFO: stat.S_IFIFO,
              T.WHITEOUT: stat.S_IFCHR}
_OPAQUE_XATTR = OPAQUE_XATTR.encode()
_ROOTS = (pyfuse3.ROOT_INODE, PLAIN_ROOT)      # the mount's root and the plain mount's
_OVERLAY_XATTR_PREFIX = OVERLAY_XATTR_PREFIX.encode()


@dataclass
class LazyLayer:
    """One mounted layer seen through one index (a zTOC): its tree, span manager and header checks."""

    digest: str
    tree: LayerTree
    fetcher: SpanFetcher
    mounted_at: float
    verifier: LayerVerifier
    xattrs_disabled: bool = False    # the index marks it `disable-xattrs`: no xattr is looked up
    # where the FUSE session holder learns which files it may read itself (service/holder_reads.py)
    read_map: ReadMap | None = None
    # What the kernel asks again and again, decoded once: a node that passed its header check
    # (never unchecked again: only a broken layer, tested on every request, takes that back), and
    # bounded memos of attributes and file extents (the index decodes an entry's every field).
    checked: bytearray = field(init=False, repr=False)
    attrs: dict[int, pyfuse3.EntryAttributes] = field(init=False, repr=False, default_factory=dict)
    extents: dict[int, tuple[int, int]] = field(init=False, repr=False, default_factory=dict)
    # directory -> (sweeps left, cached bytes at the last) of its children (`LayerFS._sweep`)
    swept: dict[int, tuple[int, int]] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.checked = bytearray(len(self.tree))

    @property
    def ztoc_digest(self) -> str:
        """The digest of the index the layer is seen through (a view per layer and index)."""
        return self.tree.index.digest

    @cached_property
    def name(self) -> bytes:
        """Its view's name: the directory it shows as at the mount's root (asked for every node ID)."""
        return view_name(self.digest, self.ztoc_digest).encode()

    @property
    def plain(self) -> bool:
        """Shown in the plain mount too: the layer answers no xattr request with anything (none in
        its index, no opaque directory, or marked so), so nothing is lost where the kernel asks none
        (service/session_holder.py)."""
        return self.xattrs_disabled or not (self.tree.opaque or self.tree.index.may_have_xattrs)


class LayerFS(pyfuse3.Operations):
    """pyfuse3 operations over all mounted lazy layers (read-only)."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._slots: dict[int, LazyLayer] = {}
        self._by_name: dict[bytes, int] = {}
        self._next_slot = 1
        # the mount root's mtime: when its layers last changed, so that the kernel drops a
        # listing of it that it cached (directories are opened without a message to the service)
        self._mounted_at = time.time_ns()
        self.sibling_headers = SiblingHeaders()

    # -- layer management (called from the control server) ---------------------

    def add_layer(self, layer: LazyLayer, slot: int | None = None) -> None:
        """Serve the layer in `slot` (the one it had before a restart: the kernel's node IDs
        carry it), or in the next free one."""
        with self._lock:
            if layer.name in self._by_name:
                return
            if slot is None or slot in self._slots:
                slot = self._next_slot
            self._next_slot = max(self._next_slot, slot + 1)
            self._slots[slot] = layer
            self._by_name[layer.name] = slot
            self._mounted_at = time.time_ns()

    def remove_layer(self, digest: str, ztoc_digest: str) -> LazyLayer | None:
        name = view_name(digest, ztoc_digest).encode()
        with self._lock:
            slot = self._by_name.pop(name, None)
            self._mounted_at = time.time_ns()
            layer = self._slots.pop(slot, None) if slot is not None else None
        if layer is not None:
            self.sibling_headers.forget(layer.ztoc_digest)
        return layer

    def layers(self) -> list[LazyLayer]:
        with self._lock:
            return list(self._slots.values())

    def has_layer(self, digest: str, ztoc_digest: str) -> bool:
        return view_name(digest, ztoc_digest).encode() in self._by_name

    def layer(self, digest: str, ztoc_digest: str) -> LazyLayer | None:
        with self._lock:
            slot = self._by_name.get(view_name(digest, ztoc_digest).encode())
            return self._slots.get(slot) if slot is not None else None

    def slot_of(self, layer: LazyLayer) -> int | None:
        """The slot the layer is served in (its node IDs' high bits); None once it is not served."""
        with self._lock:
            slot = self._by_name.get(layer.name)
            return slot if slot is not None and self._slots.get(slot) is layer else None

    # -- header checks -------------------------------------------------------------

    async def _check(self, layer: LazyLayer, n: int) -> None:
        """EIO unless node n (and what decides how it shows) matches its tar headers."""
        v = layer.verifier
        if layer.checked[n] and v.broken is None:
            return
        try:
            todo = v.unchecked(layer.tree.entries_behind(n))
            if todo and not v.check_cached(todo):
                await trio.to_thread.run_sync(self._header_check, layer, n, todo)
            self._mark_checked(layer, n)
        except LazyociError:
            raise pyfuse3.FUSEError(errno.EIO) from None     # logged by the verifier, once
        except Exception:
            log.exception("header check in layer %s failed", layer.digest)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _header_check(self, layer: LazyLayer, n: int, todo: list[int]) -> None:
        """A check that fetches (in a worker thread); then, in a scan, its siblings' headers
        are fetched ahead of their lookups (fs/sibling_headers.py)."""
        layer.verifier.check(todo)
        try:
            self.sibling_headers.missed(layer.tree, layer.verifier, layer.fetcher, n)
        except Exception:      # only a guess at what comes next: never the lookup's failure
            log.exception("layer %s: fetching headers ahead failed", layer.digest)

    def _check_children_cached(self, layer: LazyLayer, d: int, first: int) -> None:
        """Check the children of d whose headers are in the disk cache (no network), so that a
        listing hands the kernel checked attributes and `ls -l`/`find` need no LOOKUP each."""
        t, v = layer.tree, layer.verifier
        entries: list[int] = []
        for _, c in t.list(d, first):
            if layer.checked[c]:
                continue
            entries += t.own_entries(c)
        try:
            todo = sorted(set(v.unchecked(entries)))
        except LazyociError:
            todo = [i for i in sorted(set(entries)) if v.state[i] == UNCHECKED]
        # A child whose main tar header (the block before its data) is not in the cache cannot be
        # checked yet: left out before its entry is decoded and a read of its region tried, which
        # every sweep of its directory would do again while the cache fills.
        todo = [i for i in todo if self._header_cached(layer, i)]
        try:
            if v.check_cached(todo):
                return
        except LazyociError:
            pass
        for i in todo:       # some are not cached, or bad: check the others one by one
            try:
                v.check_cached([i])
            except LazyociError:
                pass       # a bad child stays unchecked in the listing; its lookup is EIO

    @staticmethod
    def _header_cached(layer: LazyLayer, i: int) -> bool:
        """The block in front of entry i's data, its main tar header, is in the disk cache."""
        index = layer.tree.index
        offset = index.entry_extent(i)[0]
        spans = index.spans_for(offset - 1, offset)
        return not spans or layer.fetcher.cache.has(spans[0])

    def _sweep(self, layer: LazyLayer, d: int) -> None:
        """Check the children of d whose headers are cached and write their entries for the
        session holder, which then answers their LOOKUPs: when the first name is looked up in the
        directory (Python's imports look up many names of one directory; of python-ml's start,
        three directories in four had a second name looked up, and the others have few children),
        and again, a few times at most, when a name reaches the service after the cache has grown,
        if children were left unchecked (their headers not cached yet)."""
        t = layer.tree
        cached = layer.fetcher.cache.cached_bytes
        left, before = layer.swept.get(d, (SWEEPS, -1))
        if left <= 0 or cached == before:
            return
        if t.child_count[d] > SWEEP_CHILDREN:
            layer.swept[d] = (0, cached)
            return
        self._check_children_cached(layer, d, 0)
        d_checked = self._checked(layer, d)        # (a name is looked up in d: it was checked)
        unchecked = [c for _, c in t.list(d) if not self._checked(layer, c, d_checked)]
        layer.swept[d] = (left - 1 if unchecked else 0, cached)

    def _checked(self, layer: LazyLayer, n: int, parent_checked: bool = False) -> bool:
        """True if node n was checked already (no I/O); `parent_checked`: its directory is, so
        only n's own entries are left to look at, not those of every directory above it."""
        if layer.checked[n] and layer.verifier.broken is None:
            return True
        t = layer.tree
        try:
            if layer.verifier.unchecked(t.own_entries(n) if parent_checked else t.entries_behind(n)):
                return False
        except LazyociError:
            return False
        self._mark_checked(layer, n)
        return True

    def _mark_checked(self, layer: LazyLayer, n: int) -> None:
        """Node n passed its header check: never checked again, and the FUSE session holder may
        answer READs of what is cached of it, if it is a file (a hardlink's name: once its target
        is checked, which the READs name)."""
        layer.checked[n] = 1
        read_map = layer.read_map
        if read_map is None:
            return
        t = layer.tree
        if t.kind[n] == T.REG and t.target[n] == n and t.entry[n] >= 0:
            self._publish(layer, n)
        m = t.target[n]
        if n and not read_map.entry_published(n):
            read_map.publish_entry(n, entry_out(self._node_attrs(layer, m)), OPAQUE if m in t.opaque else 0)

    def _publish(self, layer: LazyLayer, n: int) -> None:
        read_map = layer.read_map
        if read_map is not None and not read_map.published(n):
            read_map.publish(n, *self._extent(layer, n))

    async def _checked_node(self, inode: int) -> tuple[LazyLayer, int]:
        layer, n = self._resolve(inode)
        await self._check(layer, n)
        return layer, n

    # -- inode helpers -----------------------------------------------------------

    def _resolve(self, inode: int) -> tuple[LazyLayer, int]:
        slot, n = inode >> SLOT_SHIFT, (inode & ((1 << SLOT_SHIFT) - 1)) - 1
        layer = self._slots.get(slot)
        if layer is None or not 0 <= n < len(layer.tree):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return layer, n

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        """The node's attributes with long timeouts, decoded once: callers never change them (a
        reply with other timeouts takes `_fresh_attrs`)."""
        if inode in _ROOTS:
            return self._fresh_attrs(inode)
        return self._node_attrs(*self._resolve(inode))

    def _node_attrs(self, layer: LazyLayer, n: int) -> pyfuse3.EntryAttributes:
        """`_attrs` of node n of a layer."""
        a = layer.attrs.get(n)
        if a is None:
            if len(layer.attrs) >= MEMO_NODES:
                layer.attrs.clear()
            a = layer.attrs[n] = self._layer_attrs(layer, n)
        return a

    def _fresh_attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode not in _ROOTS:
            return self._layer_attrs(*self._resolve(inode))
        a = self._new_attrs()
        a.st_ino = inode
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2 + len(self._root_layers(inode))
        a.st_size = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._mounted_at
        a.entry_timeout = a.attr_timeout = 0.0     # layers come and go at the root
        return a

    @staticmethod
    def _new_attrs() -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_blksize = 4096
        return a

    def _layer_attrs(self, layer: LazyLayer, n: int) -> pyfuse3.EntryAttributes:
        a = self._new_attrs()
        t = layer.tree
        n = t.target[n]
        kind = t.kind[n]
        a.st_ino = self._ino(layer, n)
        a.st_nlink = t.nlink[n]
        e_idx = t.entry[n]
        if e_idx < 0:                       # implied directory (or a root without "./" entry)
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_size = 4096
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 0
            return a
        e = layer.verifier.entry(e_idx)     # as its header check decoded it, most often
        if kind == T.WHITEOUT:
            perms = 0
        elif kind == T.SYMLINK:
            perms = 0o777               # Linux symlinks are always 0777, whatever the tar says
        else:
            perms = e.mode & 0o7777
        a.st_mode = _TYPE_BITS[kind] | perms
        if kind != T.WHITEOUT:          # whiteouts are 0:0 devices owned by root, as unpacked
            a.st_uid = e.uid
            a.st_gid = e.gid
        if kind == T.REG:
            a.st_size = e.size
        elif kind == T.SYMLINK:
            a.st_size = len(os.fsencode(e.linkname))
        elif kind == T.DIR:
            a.st_size = 4096
        if kind in (T.CHAR, T.BLOCK):
            a.st_rdev = os.makedev(e.devmajor, e.devminor)
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = e.mtime_ns
        return a

    @staticmethod
    def _absent() -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = TIMEOUT
        return a

    def _ino(self, layer: LazyLayer, n: int) -> int:
        slot = self._by_name.get(layer.name, 0)
        return (slot << SLOT_SHIFT) | (n + 1)

    # -- lookups and attributes ------------------------------------------------------

    def _root_layers(self, root: int) -> list[tuple[int, LazyLayer]]:
        """The (slot, layer) pairs a root shows, by slot: the plain mount's shows plain layers only."""
        with self._lock:
            return sorted(((s, l) for s, l in self._slots.items() if root != PLAIN_ROOT or l.plain),
                          key=lambda pair: pair[0])

    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        if parent_inode in _ROOTS:
            if name in (b".", b".."):
                return self._attrs(parent_inode)
            slot = self._by_name.get(name)
            layer = None if slot is None else self._slots.get(slot)
            if slot is None or layer is None or (parent_inode == PLAIN_ROOT and not layer.plain):
                raise pyfuse3.FUSEError(errno.ENOENT)
            await self._check(layer, 0)
            a = self._fresh_attrs((slot << SLOT_SHIFT) | 1)
            a.entry_timeout = 0.0            # unmount_layer must be visible at once
            return a
        layer, d = self._resolve(parent_inode)
        t = layer.tree
        if name == b".":
            return self._attrs(parent_inode)
        if name == b"..":
            return self._attrs(pyfuse3.ROOT_INODE if d == 0 else self._ino(layer, t.parent[d]))
        read_map = layer.read_map
        if read_map is not None and t.kind[d] == T.DIR:
            if not read_map.listed(d):
                # the session holder answers the directory's absent names from now on, and the
                # names whose entries are written
                read_map.list_directory(d, ((t.name(c), c) for _, c in t.list(d)))
            self._sweep(layer, d)
        n = t.lookup(d, name)
        if n is None:
            # a layer's tree never changes: the kernel may remember that the name is absent
            # (an entry without an inode) as long as it remembers what is present
            return self._absent()
        await self._check(layer, n)
        return self._attrs(self._ino(layer, t.target[n]))

    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        if inode not in _ROOTS:
            await self._checked_node(inode)
        return self._attrs(inode)

    async def readlink(self, inode: int, ctx=None) -> bytes:
        layer, n = await self._checked_node(inode)
        if layer.tree.kind[n] != T.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(layer.tree.index.entry(layer.tree.entry[n]).linkname)

    async def statfs(self, ctx=None) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        total = sum(l.fetcher.cache.total_bytes for l in self.layers())
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = sum(len(l.tree) for l in self.layers()) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- xattrs ----------------------------------------------------------------------

    def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        if inode in _ROOTS:
            return {}
        layer, n = self._resolve(inode)
        t = layer.tree
        n = t.target[n]
        out: dict[bytes, bytes] = {}
        if t.entry[n] >= 0 and t.kind[n] != T.WHITEOUT:
            for k, v in (t.index.entry(t.entry[n]).xattrs or {}).items():
                if is_overlay_xattr(k):
                    continue
                key = k.encode() if isinstance(k, str) else bytes(k)
                out[key] = v.encode("utf-8", "surrogateescape") if isinstance(v, str) else bytes(v)
        if n in t.opaque:
            out[_OPAQUE_XATTR] = b"y"
        return out

    def _no_xattrs(self, inode: int) -> bool:
        """The inode's layer is marked `disable-xattrs`: it has none, and nothing is fetched to say so
        (the reference's snapshotter turns xattrs off for such a layer's mount)."""
        return inode not in _ROOTS and self._resolve(inode)[0].xattrs_disabled

    async def getxattr(self, inode: int, name: bytes, ctx=None) -> bytes:
        if self._no_xattrs(inode):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if inode not in _ROOTS:
            layer, n = await self._checked_node(inode)
            if name.startswith(_OVERLAY_XATTR_PREFIX):
                # overlayfs asks every lower file and directory it looks up for its own xattrs; a
                # layer never carries them (_xattrs drops them), only the opaque marker is made here
                if name == _OPAQUE_XATTR and layer.tree.target[n] in layer.tree.opaque:
                    return b"y"
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = self._xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: int, ctx=None) -> list[bytes]:
        if self._no_xattrs(inode):
            return []
        if inode not in _ROOTS:
            await self._checked_node(inode)
        return list(self._xattrs(inode))

    async def setxattr(self, inode, name, value, ctx=None):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode, name, ctx=None):
        raise pyfuse3.FUSEError(errno.EROFS)

    # -- directories -----------------------------------------------------------------

    async def opendir(self, inode: int, ctx=None) -> int:
        if inode not in _ROOTS:
            layer, n = await self._checked_node(inode)
            if layer.tree.kind[layer.tree.target[n]] != T.DIR:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token) -> None:
        """Entries "." and ".." first (what `ls -a` and overlay's plain lower dirs show), then children.

        Offsets: 1 after ".", 2 after "..", 3 + i after the i-th child (the session holder ends
        a listed directory's listing itself from these: service/holder_reads.py)."""
        if fh in _ROOTS:
            parent = fh
        else:       # fh is the node ID (opendir's, or the holder's for an open without a message)
            layer, d = await self._checked_node(fh)
            parent = pyfuse3.ROOT_INODE if d == 0 else self._ino(layer, layer.tree.parent[d])
        for pos, (name, ino) in enumerate(((b".", fh), (b"..", parent))):
            if start_id <= pos and not pyfuse3.readdir_reply(token, name, self._attrs(ino), pos + 1):
                return
        first = max(start_id - 2, 0)
        if fh in _ROOTS:
            for i, (slot, layer) in enumerate(self._root_layers(fh)):
                if i < first:
                    continue
                attrs = self._fresh_attrs((slot << SLOT_SHIFT) | 1)
                if not self._checked(layer, 0):
                    attrs.entry_timeout = attrs.attr_timeout = 0.0
                if not pyfuse3.readdir_reply(token, layer.name, attrs, i + 3):
                    return
            return
        t = layer.tree
        self._check_children_cached(layer, d, first)
        for i, c in t.list(d, first):
            if self._checked(layer, c):
                attrs = self._attrs(self._ino(layer, t.target[c]))
            else:                                # the kernel must ask again before using them
                attrs = self._fresh_attrs(self._ino(layer, t.target[c]))
                attrs.entry_timeout = attrs.attr_timeout = 0.0
            if not pyfuse3.readdir_reply(token, t.name(c), attrs, i + 3):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files -----------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx=None) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        layer, n = await self._checked_node(inode)
        if layer.tree.kind[layer.tree.target[n]] != T.REG:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    def _extent(self, layer: LazyLayer, n: int) -> tuple[int, int]:
        """Where file node n's data lies in the layer's tar stream: (offset, size)."""
        extent = layer.extents.get(n)
        if extent is None:
            t = layer.tree
            if len(layer.extents) >= MEMO_NODES:
                layer.extents.clear()
            extent = layer.extents[n] = t.index.entry_extent(t.entry[t.target[n]])
        return extent

    async def read(self, fh: int, off: int, size: int) -> bytes:
        layer, n = await self._checked_node(fh)
        offset, file_size = self._extent(layer, n)
        if layer.read_map is not None and layer.tree.kind[layer.tree.target[n]] == T.REG:
            self._publish(layer, n)      # checked (a hardlink's target reached through its name)
        if off >= file_size or size <= 0:
            return b""
        start = offset + off
        file_end = offset + file_size             # read-ahead stays inside the file
        end = min(file_end, start + size)
        fetcher = layer.fetcher
        cache = fetcher.cache
        if cache.cached_bytes < cache.total_bytes:
            index = layer.tree.index
            last = index.spans_for(end - 1, end)
            if last and file_end > index.span_uncompressed_range(last[0])[1]:
                fetcher.prefetch(last[0] + 1)     # the file goes on in the next span: read ahead
        try:
            data = fetcher.read_cached(start, end, file_end)
            if data is not None:
                return data
            return await trio.to_thread.run_sync(fetcher.read, start, end, False, True, file_end)
        except LazyociError as exc:
            log.error("read of %s in layer %s failed: %s", layer.tree.name(n).decode(errors="replace"),
                      layer.digest, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("read in layer %s failed", layer.digest)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh: int) -> None:
        return None

    async def forget(self, inode_list) -> None:
        return None      # inode numbers are computed, nothing to free

    async def access(self, inode: int, mode: int, ctx=None) -> bool:
        return not (mode & os.W_OK)
