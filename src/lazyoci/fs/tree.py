"""A compact directory tree of one lazy layer, built from its index (fs/layer_index.py).

No Python object per file: the tree is a handful of `array` columns indexed by
"node" (0 = the layer's root directory); names and attributes stay in the index
(a zTOC keeps them in its FlatBuffer bytes) and are decoded on demand. Memory is
~30 bytes per entry on top of the index, so a 100,000-file layer costs a few MiB
and builds in a second.

Tar semantics as overlayfs layers expect them:
- names are normalised ("./a/b/" -> "a/b"); missing parent directories are implied
  (0755, root-owned); a later entry for the same path replaces an earlier one;
- `.wh.NAME` becomes a whiteout node NAME (a 0:0 character device);
  `.wh..wh..opq` marks its directory opaque and is not shown (oci/whiteout.py);
- a hardlink is a second node sharing its target's inode (`target` column),
  and the target's link count counts it.
"""

from __future__ import annotations

import builtins
import logging
import os
from array import array
from bisect import bisect_left
from typing import Iterator

from lazyoci.fs.layer_index import LayerIndex
from lazyoci.oci.whiteout import WHITEOUT_PREFIX, is_opaque_marker, normalise, whiteout_target

log = logging.getLogger(__name__)

# node kinds
DIR, REG, SYMLINK, CHAR, BLOCK, FIFO, WHITEOUT, HARDLINK = range(8)
_KINDS = {"dir": DIR, "reg": REG, "symlink": SYMLINK, "char": CHAR, "block": BLOCK,
          "fifo": FIFO, "hardlink": HARDLINK}


class LayerTree:
    """The nodes of one layer; see the module docstring."""

    _COLUMNS = ("entry", "parent", "kind", "target", "nlink", "child_start", "child_count", "children",
                "opaque", "implied_names")
    entry: array
    parent: array
    kind: bytearray
    target: array
    nlink: array
    child_start: array
    child_count: array
    children: array
    opaque: dict[int, list[int]]
    implied_names: dict[int, bytes]

    def __init__(self, index: LayerIndex, columns: dict | None = None) -> None:
        """Build the tree from the index; or take `columns`, what `columns()` gave of a tree built
        from the same index elsewhere (a helper process: service/index_parsing.py)."""
        self.index = index
        if columns is not None:
            for name in self._COLUMNS:
                setattr(self, name, columns[name])
            if not len(self.parent) == len(self.kind) == len(self.target) == len(self.nlink) == \
                    len(self.child_start) == len(self.child_count) == len(self.entry):
                raise ValueError("the tree's columns handed over differ in length")
            return
        self.entry = array("i", [-1])        # index entry number, -1 = implied directory
        self.parent = array("i", [0])
        self.kind = bytearray([DIR])
        self.target = array("i", [0])        # the node whose inode this is (hardlinks)
        self.nlink = array("I", [2])
        self.child_start = array("i")
        self.child_count = array("i")
        self.children = array("i")
        self.opaque: dict[int, list[int]] = {}   # opaque directory -> its `.wh..wh..opq` entries
        self.implied_names: dict[int, bytes] = {}
        self._build()

    def __len__(self) -> int:
        return len(self.entry)

    def columns(self) -> dict:
        """Everything the tree holds but its index (to hand it to another process)."""
        return {name: getattr(self, name) for name in self._COLUMNS}

    # -- building --------------------------------------------------------------

    def _build(self) -> None:
        paths: dict[str, int] = {"": 0}          # dropped when the build is done
        names: list[bytes] = [b""]
        hardlinks: list[tuple[int, str]] = []
        entries, parents, kinds, targets, nlinks = self.entry, self.parent, self.kind, self.target, self.nlink

        def add(path: str, base: str, kind: int, entry: int, parent: int) -> int:
            """A new node for `path` in directory `parent`."""
            n = len(entries)
            paths[path] = n
            entries.append(entry)
            parents.append(parent)
            kinds.append(kind)
            targets.append(n)
            nlinks.append(2 if kind == DIR else 1)
            names.append(base.encode("utf-8", "surrogateescape"))
            return n

        def node(path: str, base: str, kind: int, entry: int) -> int:
            """The node of `path`, added (after any implied directories above it) or replaced."""
            n = paths.get(path)
            if n is None:
                return add(path, base, kind, entry, dir_of(path.rpartition("/")[0]))
            entries[n] = entry
            kinds[n] = kind
            nlinks[n] = 2 if kind == DIR else 1
            return n

        def dir_of(path: str) -> int:
            n = paths.get(path)
            if n is not None and self.kind[n] == DIR:
                return n
            base = path.rpartition("/")[2]
            n = node(path, base, DIR, -1)
            self.implied_names[n] = os.fsencode(base)
            return n

        for i, (raw, type_name, link) in enumerate(self.index.tree_entries()):
            raw_name = raw.decode("utf-8", "surrogateescape")
            path = normalise(raw_name)
            if path is None:
                log.warning("zTOC entry %r escapes the layer; ignored", raw_name)
                continue
            kind = _KINDS.get(type_name)
            if kind is None:
                log.warning("zTOC entry %r has an unknown type; ignored", raw_name)
                continue
            if path == "":
                if kind == DIR:
                    self.entry[0] = i
                continue
            dirpath, _, base = path.rpartition("/")
            if base.startswith(WHITEOUT_PREFIX):      # (both kinds of special names start so)
                if is_opaque_marker(base):
                    self.opaque.setdefault(dir_of(dirpath), []).append(i)
                    continue
                hidden = whiteout_target(base)
                if hidden is not None:
                    base = hidden
                    path = f"{dirpath}/{base}" if dirpath else base
                    kind = WHITEOUT
            parent = paths.get(dirpath, -1)
            if parent >= 0 and kinds[parent] == DIR and path not in paths:
                n = add(path, base, kind, i, parent)   # the usual entry: new, in a directory listed before it
            else:
                n = node(path, base, kind, i)
                self.implied_names.pop(n, None)
            if kind == HARDLINK:
                hardlinks.append((n, link.decode("utf-8", "surrogateescape")))

        for n, linkname in hardlinks:
            dest = normalise(linkname)
            t = paths.get(dest) if dest is not None else None
            while t is not None and self.kind[t] == HARDLINK and self.target[t] != t:
                t = self.target[t]
            if t is None or self.kind[t] in (DIR, HARDLINK, WHITEOUT):
                log.warning("hardlink %r -> %r has no target in the layer; hidden", n, linkname)
                self.parent[n] = -1
                continue
            self.target[n] = t
            self.nlink[t] += 1
        del paths             # the closures share this cell: deleting it frees the dict now, not at GC

        # children of every directory, sorted by name bytes (for binary search)
        count = len(self.entry)
        keys = list(zip(self.parent, names))      # (directory, name) of every node
        order = sorted(range(1, count), key=keys.__getitem__)
        del names, keys
        order = order[bisect_left(order, 0, key=self.parent.__getitem__):]   # hidden: no directory
        self.child_start = array("i", [0]) * count
        self.child_count = array("i", [0]) * count
        self.children = array("i", order)
        for pos, n in enumerate(order):
            p = self.parent[n]
            if self.child_count[p] == 0:
                self.child_start[p] = pos
            self.child_count[p] += 1
            if self.kind[n] == DIR:
                self.nlink[p] += 1

    # -- queries ---------------------------------------------------------------

    def name(self, n: int) -> bytes:
        """The name of node n in its directory (read from the index on demand)."""
        implied = self.implied_names.get(n)
        if implied is not None or n == 0:
            return implied or b""
        raw = self.index.entry_name(self.entry[n]).rstrip(b"/")
        base = raw.rpartition(b"/")[2]
        if base in (b".", b".."):     # odd spellings ("a/b/."): take the normalised path
            path = normalise(raw.decode("utf-8", "surrogateescape")) or ""
            base = os.fsencode(path.rpartition("/")[2])
        if self.kind[n] == WHITEOUT:
            base = base[len(WHITEOUT_PREFIX):]
        return base

    def lookup(self, d: int, name: bytes) -> int | None:
        """The child of directory d called `name`, by binary search."""
        if self.kind[d] != DIR:
            return None
        lo = self.child_start[d]
        hi = lo + self.child_count[d]
        while lo < hi:
            mid = (lo + hi) // 2
            c = self.children[mid]
            cname = self.name(c)
            if cname == name:
                return c
            if cname < name:
                lo = mid + 1
            else:
                hi = mid
        return None

    def list(self, d: int, start: int = 0) -> Iterator[tuple[int, int]]:
        """(position, child) of directory d from position `start`."""
        first = self.child_start[d]
        for pos in range(start, self.child_count[d]):
            yield pos, self.children[first + pos]

    def entries_behind(self, n: int) -> builtins.list[int]:
        """The index entries whose tar headers decide what node n shows: its own (`own_entries`)
        and those of every directory above it; each once (a check of the list checks each entry
        it names)."""
        out: builtins.list[int] = []
        while True:
            out += self.own_entries(n)
            if n <= 0:      # the layer root (or a hidden hardlink, which has no parent)
                return out
            n = self.parent[n]

    def own_entries(self, n: int) -> builtins.list[int]:
        """Node n's own entry, its hardlink target's and its opaque markers'."""
        out = [self.entry[n]] if self.entry[n] >= 0 else []
        m = self.target[n]
        if m != n and self.entry[m] >= 0:
            out.append(self.entry[m])
        opaque = self.opaque.get(n)
        if opaque:
            out += opaque
        return out

    def walk(self, d: int = 0, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        """(relative path, node) of every node below d, depth first (for tests and status)."""
        for _, c in self.list(d):
            path = prefix + self.name(c)
            yield path, c
            if self.kind[c] == DIR:
                yield from self.walk(c, path + b"/")
