"""An eStargz layer's own index (its TOC, `stargz.index.json`) as a lazy layer index.

An eStargz blob is a gzip stream made of many gzip members: the tar headers lie
in members of their own, each file's data is cut into chunks and every chunk
starts a new member at the compressed offset the TOC gives (`offset`; newer
writers put small chunks together in one member, each at its `innerOffset`).
The TOC sits near the end, in a member holding a tar entry `stargz.index.json`,
followed by the footer (estargz/footer.py).

What the lazy filesystem sees (fs/layer_index.py):
- the stream is the concatenation of every file's data in TOC order (the tar
  headers are not in it: the TOC is the metadata, trusted because its digest is
  the layer's `containerd.io/snapshot/stargz/toc.digest` annotation, checked by
  the pull before the index is stored); so `headers_in_stream` is False and the
  header checks do not apply;
- a span is one gzip member holding chunks: fetched from its offset to the next
  member's (the last one to the TOC), inflated, and each of its chunks checked
  against its `chunkDigest` (a digest of the uncompressed chunk) before a byte is
  served. A member that does not inflate is treated as bytes that do not match,
  so a corrupted byte gives EIO, never wrong data;
- the view is the layer's whole tar, as a full unpack shows it: the landmarks
  `.prefetch.landmark` / `.no.prefetch.landmark` and `stargz.index.json` too (the
  reference hides them; lazyoci shows them so that a lazy layer, a layer downloaded
  whole and a zTOC view of the same layer are one tree). The TOC file's data is the
  last span: the TOC member, inflated and checked against the TOC's digest. Its tar
  header must be a plain root-owned file without setuid/setgid/sticky bits, as the
  writer makes it (the annotation covers the TOC, not that header);
- the data of the files before `.prefetch.landmark` is what a mount prefetches
  (`prefetch_bytes`; none with `.no.prefetch.landmark`).

The data this class parses is the layer blob's tail: from the TOC offset to the
end, footer included, so the index knows where the last member ends. Everything
is checked when parsed (names, types, chunk tiling, offsets inside the blob and
going forward, sizes under the caps of ztoc/limits.py): a TOC that breaks a rule
is a FormatError, and the pull downloads the layer whole.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from lazyoci.chunked_index import ChunkedIndex
from lazyoci.errors import FormatError, IntegrityError
from lazyoci.estargz.footer import parse_footer
from lazyoci.oci.compression import inflate_gzip_member
from lazyoci.tar.headers import TarHeader, iter_headers
from lazyoci.ztoc.limits import (MAX_ENTRIES, MAX_SPAN_BYTES, MAX_XATTR_NAME_BYTES, MAX_XATTR_VALUE_BYTES,
                                 MAX_ZTOC_BYTES, check_name)

__all__ = ["EStargzEntry", "EStargzIndex", "TOC_NAME", "PREFETCH_LANDMARK", "NO_PREFETCH_LANDMARK"]

TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


class EStargzEntry(NamedTuple):
    """One entry of the layer as its TOC describes it (fs/layer_index.py's IndexEntry)."""

    name: str
    type: str
    offset: int          # where its data starts in the stream of file data (see the module docstring)
    size: int
    linkname: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    devmajor: int
    devminor: int
    xattrs: Mapping[str, bytes]


class _Chunk(NamedTuple):
    member: int          # compressed offset of its gzip member
    inner: int           # where it starts in the inflated member
    size: int
    digest: str


class _Span(NamedTuple):
    cstart: int
    cend: int
    ustart: int
    uend: int
    chunks: tuple[_Chunk, ...]


def _int(ent: dict[str, Any], key: str, where: str) -> int:
    value = ent.get(key, 0)
    if type(value) is not int or value < 0:
        raise FormatError(f"{where}: {key} {value!r} is not a non-negative integer")
    return value


def _str(ent: dict[str, Any], key: str, where: str) -> str:
    value = ent.get(key, "")
    if not isinstance(value, str):
        raise FormatError(f"{where}: {key} {value!r} is not a string")
    return value


def _mtime_ns(text: str, where: str) -> int:
    if not text:
        return 0
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise FormatError(f"{where}: modtime {text!r} is not an RFC 3339 time") from None
    if t.tzinfo is None:
        raise FormatError(f"{where}: modtime {text!r} has no time zone")
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


_NOT_TEXT = re.compile("[\ufffd\ud800-\udfff]")


def _utf8(text: str, where: str) -> bytes:
    """A TOC string as the bytes of the tar. The TOC is JSON: its writer turns bytes that are not
    UTF-8 into U+FFFD, so which bytes the tar holds is lost; such a name is refused (the layer
    is downloaded whole) rather than shown as another name than a full unpack makes."""
    if _NOT_TEXT.search(text):
        raise FormatError(f"{where}: {text[:64]!r} is not UTF-8 text in the TOC (the tar's bytes are lost)")
    return text.encode()


def _name(raw: str, where: str) -> str:
    """The entry's name, refused when it is absolute or climbs out (`..`)."""
    encoded = _utf8(raw, where)
    check_name(encoded, where)
    if raw.startswith("/"):
        raise FormatError(f"{where}: the name {raw[:64]!r} is absolute")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FormatError(f"{where}: the name {raw[:64]!r} climbs out of the layer (..)")
    return "/".join(parts)


def _xattrs(ent: dict[str, Any], where: str) -> dict[str, bytes]:
    raw = ent.get("xattrs") or {}
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: xattrs is not an object")
    out = {}
    for key, value in raw.items():
        if not isinstance(value, str):
            raise FormatError(f"{where}: xattr {key[:64]!r} is not base64 text")
        try:
            data = base64.b64decode(value, validate=True)
        except ValueError:
            raise FormatError(f"{where}: xattr {key[:64]!r} is not valid base64") from None
        MAX_XATTR_NAME_BYTES.check(len(_utf8(key, f"{where}: xattr name")), f"{where}: xattr name")
        MAX_XATTR_VALUE_BYTES.check(len(data), f"{where}: xattr {key[:64]!r}")
        if not key or "\0" in key:
            raise FormatError(f"{where}: xattr name {key[:64]!r} is not valid")
        out[key] = data
    return out


def read_toc(tail: bytes) -> tuple[int, bytes]:
    """(TOC offset, TOC JSON bytes) from the blob's tail [TOC offset, end): its footer says where
    the TOC member starts, which must be where the tail starts."""
    toc_offset, footer_size = parse_footer(tail)
    return toc_offset, _toc_member(tail[:-footer_size])[1]


def _toc_member(member: bytes) -> tuple[TarHeader, bytes]:
    """The tar header and the data of `stargz.index.json` from the gzip member that holds it."""
    MAX_ZTOC_BYTES.check(len(member), "the eStargz TOC")
    try:
        tar, after = inflate_gzip_member(member, MAX_ZTOC_BYTES.value + 1)
    except FormatError as e:
        raise FormatError(f"eStargz TOC {e}") from None
    MAX_ZTOC_BYTES.check(len(tar), "the inflated eStargz TOC")
    if after != b"":
        raise FormatError("eStargz TOC: the bytes between the TOC offset and the footer are not one gzip member")
    f = io.BytesIO(tar)
    for header in iter_headers(f):
        if header.name != TOC_NAME.encode() or header.type != "reg":
            raise FormatError(f"eStargz TOC: the member at the TOC offset holds {header.name[:64]!r}, "
                              f"not {TOC_NAME}")
        toc = tar[header.offset:header.offset + header.size]
        if len(toc) != header.size:
            raise FormatError("eStargz TOC: cut short")
        if header.uid or header.gid or header.mode & 0o7000:
            raise FormatError(f"eStargz TOC: {TOC_NAME} is owned by {header.uid}:{header.gid} with mode "
                              f"{header.mode:o}, not a plain root-owned file as eStargz writers make it")
        return header, toc
    raise FormatError("eStargz TOC: the member at the TOC offset holds no tar entry")


class EStargzIndex(ChunkedIndex[EStargzEntry, _Span]):
    """Parse with `EStargzIndex.parse(tail, digest)`; see the module docstring."""

    def __init__(self, digest: str, toc_digest: str, toc_offset: int, entries: list[EStargzEntry],
                 spans: list[_Span], prefetch_bytes: int) -> None:
        super().__init__(digest, entries, spans, "the eStargz TOC")
        self.toc_digest = toc_digest
        self.toc_offset = toc_offset
        self.prefetch_bytes = prefetch_bytes

    @classmethod
    def parse(cls, tail: bytes, digest: str | None = None) -> "EStargzIndex":
        MAX_ZTOC_BYTES.check(len(tail), "the eStargz TOC")
        toc_offset, footer_size = parse_footer(tail)
        header, toc = _toc_member(tail[:-footer_size])
        try:
            doc = json.loads(toc)
        except (ValueError, RecursionError) as e:
            raise FormatError(f"eStargz TOC is not JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
            raise FormatError("eStargz TOC has no list of entries")
        if doc.get("version") != 1:
            raise FormatError(f"eStargz TOC version {doc.get('version')!r} is not 1")
        MAX_ENTRIES.check(len(doc["entries"]), "the eStargz TOC's entries")
        entries, spans, prefetch = cls._build(doc["entries"], toc_offset)
        # stargz.index.json itself: the last entry, its data the last span (the TOC member)
        pos = spans[-1].uend if spans else 0
        entries.append(EStargzEntry(TOC_NAME, "reg", pos, len(toc), "", header.mode & 0o7777, 0, 0,
                                    header.mtime_ns, 0, 0, {}))
        spans.append(_Span(toc_offset, len(tail) - footer_size + toc_offset, pos, pos + len(toc), ()))
        return cls(digest or "sha256:" + hashlib.sha256(tail).hexdigest(),
                   "sha256:" + hashlib.sha256(toc).hexdigest(), toc_offset, entries, spans, prefetch)

    @staticmethod
    def _build(raw_entries: list[Any], toc_offset: int) -> tuple[list[EStargzEntry], list[_Span], int]:
        entries: list[EStargzEntry] = []
        seen: set[str] = set()
        chunks: list[_Chunk] = []
        pos = 0                       # the stream of file data so far
        prefetch = -1
        current: dict[str, Any] | None = None   # the reg entry whose chunks follow
        covered = 0                   # bytes of `current` its chunks covered so far

        def close_file(where: str) -> None:
            if current is not None and covered != current["size"]:
                raise FormatError(f"{where}: the chunks of {current['name']!r} cover {covered} of its "
                                  f"{current['size']} bytes")

        for n, ent in enumerate(raw_entries):
            where = f"eStargz TOC entry {n}"
            if not isinstance(ent, dict):
                raise FormatError(f"{where} is not an object")
            typ = _str(ent, "type", where)
            if typ == "chunk":
                if current is None:
                    raise FormatError(f"{where}: a chunk without a regular file before it")
                chunk_offset = _int(ent, "chunkOffset", where)
            elif typ in _TYPES:
                close_file(where)
                current, covered = None, 0
                chunk_offset = 0
            else:
                raise FormatError(f"{where}: unknown entry type {typ!r}")
            if typ != "chunk":
                name = _name(_str(ent, "name", where), where)
                size = _int(ent, "size", where)
                if typ != "reg" and size:
                    raise FormatError(f"{where}: a {typ} entry with a size")
                linkname = _str(ent, "linkName", where)
                _utf8(linkname, f"{where}: link target")
                if typ in ("symlink", "hardlink"):
                    check_name(_utf8(linkname, f"{where}: link target"), f"{where}: link target", link=True)
                if typ == "hardlink":
                    target = _name(linkname, f"{where}: hardlink target")
                    if target not in seen:
                        raise FormatError(f"{where}: hardlink {name[:64]!r} to {linkname[:64]!r}, "
                                          f"which no entry before it is")
                if name in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK) and prefetch < 0:
                    prefetch = pos if name == PREFETCH_LANDMARK else 0
                if name == TOC_NAME:
                    raise FormatError(f"{where}: the TOC lists {TOC_NAME}, the name of the TOC itself")
                seen.add(name)
                entries.append(EStargzEntry(
                    name, typ, pos, size, linkname, _int(ent, "mode", where) & 0o7777,
                    _int(ent, "uid", where), _int(ent, "gid", where),
                    _mtime_ns(_str(ent, "modtime", where), where),
                    _int(ent, "devMajor", where), _int(ent, "devMinor", where), _xattrs(ent, where)))
                if typ != "reg" or size == 0:
                    continue
                current = {"name": name, "size": size}
            # a chunk of `current`: the reg entry itself holds the first
            assert current is not None      # set just above, or checked for a "chunk" entry
            size = current["size"]
            chunk_size = _int(ent, "chunkSize", where) or size - chunk_offset
            if chunk_offset != covered or chunk_size <= 0 or chunk_offset + chunk_size > size:
                raise FormatError(f"{where}: chunk [{chunk_offset}, {chunk_offset + chunk_size}) of "
                                  f"{current['name']!r} does not follow the chunk before it")
            member, inner = _int(ent, "offset", where), _int(ent, "innerOffset", where)
            digest = _str(ent, "chunkDigest", where)
            if not _DIGEST.match(digest):
                raise FormatError(f"{where}: chunk of {current['name']!r} has no sha256 chunkDigest")
            if member == 0 or member >= toc_offset:
                raise FormatError(f"{where}: chunk of {current['name']!r} at blob offset {member}, "
                                  f"outside the layer's data (the TOC starts at {toc_offset})")
            covered += chunk_size
            if chunks:
                last = chunks[-1]
                if member < last.member or (member == last.member and inner < last.inner + last.size):
                    raise FormatError(f"{where}: chunk of {current['name']!r} overlaps or goes before "
                                      f"the chunk before it")
            chunks.append(_Chunk(member, inner, chunk_size, digest))
            pos += chunk_size
        close_file("the end of the eStargz TOC")
        return entries, _spans(chunks, toc_offset), max(prefetch, 0)

    # ---- the LayerIndex protocol (the rest: chunked_index.py) --------------------------

    def entry_name(self, i: int) -> bytes:
        return self._entries[i].name.encode()

    def tree_entries(self) -> Iterator[tuple[bytes, str, bytes]]:
        for e in self._entries:
            link = e.linkname.encode() if e.type == "hardlink" else b""
            yield e.name.encode(), e.type, link

    def span_digest(self, i: int) -> str:
        s = self._span(i)
        return s.chunks[0].digest if s.chunks else self.toc_digest

    def decompress_span(self, i: int, fetched: bytes) -> bytes:
        """Span i's file data from its gzip member: IntegrityError unless it inflates and every
        chunk in it has its chunkDigest (bytes that do not decode are bytes that do not match)."""
        self.verify_span(i, fetched)
        s = self._span(i)
        if not s.chunks:      # the TOC member: stargz.index.json's data
            try:
                toc = _toc_member(fetched)[1]
            except FormatError as e:
                raise IntegrityError(f"span {i} (the TOC) does not decode: {e}") from None
            actual = "sha256:" + hashlib.sha256(toc).hexdigest()
            if actual != self.toc_digest:
                raise IntegrityError(f"span {i}: TOC digest mismatch: expected {self.toc_digest}, got {actual}",
                                     expected=self.toc_digest, actual=actual)
            return toc
        last = s.chunks[-1]
        need = last.inner + last.size
        try:
            data = inflate_gzip_member(fetched, need)[0]
        except FormatError as e:
            raise IntegrityError(f"span {i} {e}") from None
        if len(data) < need:
            raise IntegrityError(f"span {i} inflates to {len(data)} bytes, its chunks need {need}")
        parts = []
        for c in s.chunks:
            piece = data[c.inner:c.inner + c.size]
            actual = "sha256:" + hashlib.sha256(piece).hexdigest()
            if actual != c.digest:
                raise IntegrityError(f"span {i}: chunk digest mismatch: expected {c.digest}, got {actual}",
                                     expected=c.digest, actual=actual)
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __repr__(self) -> str:
        return f"<EStargzIndex {len(self)} entries, {self.num_spans} spans, {self.uncompressed_size} bytes of file data>"


def _spans(chunks: list[_Chunk], toc_offset: int) -> list[_Span]:
    """The gzip members holding chunks, in blob order: each from its offset to the next's."""
    spans: list[_Span] = []
    group: list[_Chunk] = []
    pos = 0
    members = [c.member for c in chunks]
    for k, c in enumerate(chunks):
        group.append(c)
        if k + 1 < len(chunks) and members[k + 1] == c.member:
            continue
        cend = members[k + 1] if k + 1 < len(chunks) else toc_offset
        usize = sum(g.size for g in group)
        MAX_SPAN_BYTES.check(cend - c.member, f"the gzip member at {c.member} of the eStargz layer")
        MAX_SPAN_BYTES.check(group[-1].inner + group[-1].size, f"the chunks of the gzip member at {c.member}")
        spans.append(_Span(c.member, cend, pos, pos + usize, tuple(group)))
        pos += usize
        group = []
    return spans
