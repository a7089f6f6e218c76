"""A zstd:chunked layer's TOC as a lazy layer index (fs/layer_index.py `LayerIndex`).

A zstd:chunked blob is a series of zstd frames whose decoded concatenation is the
layer's tar stream: each regular file's content starts a new frame and may be cut
into several chunks, one frame each; the tar headers and padding between files sit
in frames of their own. The TOC (a zstd-compressed JSON document in a skippable
frame near the end) lists every entry with its attributes and, for a file with
content, where its chunks lie in the blob and the sha256 of each chunk's (or the
whole file's) *decoded* bytes.

The index this module serves is not the tar stream but the stream of file contents
alone: regular files' data, one after another in TOC order. Each chunk is one span
(its frames are fetched, decoded, then checked against the chunk digest); a file
whose chunks lack their own digests is one span checked against the file's digest.
The tar headers are not in that stream, so fs/header_check.py has nothing to compare
entries with (`headers_in_stream` is False): what vouches for the entries is the
TOC's own digest, which the layer's `manifest-checksum` annotation gives and the
image manifest's digest covers (see zstdchunked/fetch.py).

Everything is checked when the TOC is parsed, before the tree or a read uses it:
entry types and names (no absolute path, no `..`, names the kernel could create),
xattrs (base64, within Linux's limits), chunks that tile each file, frames in blob
order that neither overlap nor run past the TOC, and the caps below.

Memory: the service keeps one small tuple per entry and per chunk (a few hundred bytes
for a file), where a zTOC is kept as its own bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterator
from typing import Any, NamedTuple

from lazyoci.chunked_index import ChunkedIndex
from lazyoci.errors import FormatError, IntegrityError
from lazyoci.oci.compression import decode_zstd_frames, sniff_compression
from lazyoci.ztoc import limits
from lazyoci.ztoc.limits import Limit
from lazyoci.ztoc.toc import parse_rfc3339_nano

__all__ = ["ChunkedEntry", "MAX_CHUNKS", "MAX_TOC_BYTES", "MAX_TOC_COMPRESSED_BYTES",
           "ZstdChunkedToc", "is_chunked_toc"]

ENTRY_TYPES = frozenset({"reg", "dir", "symlink", "hardlink", "char", "block", "fifo"})
SUPPORTED_VERSIONS = frozenset({1})

# The service decodes the whole TOC's JSON at once (a few times its size in Python objects while
# it is parsed) and keeps a small tuple per entry. containers/storage writes ~400 bytes of JSON per
# file (more for chunked files), so 256 MiB, the zTOC's cap, is past half a million files.
MAX_TOC_BYTES = Limit("MAX_TOC_BYTES", limits.MAX_ZTOC_BYTES.value, "bytes",
                      "a decoded zstd:chunked TOC, which the service parses whole")
MAX_TOC_COMPRESSED_BYTES = Limit("MAX_TOC_COMPRESSED_BYTES", limits.MAX_ZTOC_BYTES.value, "bytes",
                                 "a compressed zstd:chunked TOC, downloaded and stored whole")
# containers/storage cuts files into chunks of tens of KiB on average, so a layer has far more
# chunks than a zTOC has spans; the service keeps a few dozen bytes per chunk.
MAX_CHUNKS = Limit("MAX_CHUNKS", 4_000_000, "chunks", "chunks in one zstd:chunked TOC, each with state "
                                                      "in the service")


def is_chunked_toc(data: bytes) -> bool:
    """Whether stored index bytes are a zstd:chunked TOC (a zstd frame) rather than a zTOC (a
    FlatBuffer, whose first word is a root offset far below the 0xFD2FB528 this magic reads as)."""
    return sniff_compression(data) == "zstd"


class ChunkedEntry(NamedTuple):
    """One entry of the TOC, in the shape fs/ reads (fs/layer_index.py `IndexEntry`)."""

    name: str
    type: str
    offset: int              # where its content starts in the stream of file contents
    size: int
    linkname: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]
    digest: str              # sha256 of the whole file's content ("" without content)


class _Chunk(NamedTuple):
    cstart: int              # compressed range in the layer blob
    cend: int
    ustart: int              # range in the stream of file contents
    uend: int
    digest: str              # sha256 of the decoded bytes


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"zstd:chunked TOC: {what} is not a string")
    return value


def _int(value: Any, what: str, low: int = 0, high: int = (1 << 63) - 1) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FormatError(f"zstd:chunked TOC: {what} {value!r} is not an integer in [{low}, {high}]")
    return value


def _sha256(value: Any, what: str) -> str:
    text = _text(value, what)
    if len(text) != 71 or not text.startswith("sha256:") or \
            not all(c in "0123456789abcdef" for c in text[7:]):
        raise FormatError(f"zstd:chunked TOC: {what} {text[:80]!r} is not a sha256 digest")
    return text


def _bytes(text: str, what: str) -> bytes:
    """A name as the filesystem takes it (JSON may spell a lone surrogate, which no name holds)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise FormatError(f"{what} {text[:128]!r} is not a valid name") from None


def _safe_name(name: str, what: str) -> None:
    """A name inside the layer: relative, without `..`, one the kernel could create."""
    limits.check_name(_bytes(name, what), what)
    if name.startswith("/") or ".." in name.split("/"):
        raise FormatError(f"{what} {name[:128]!r} leaves the layer (absolute or with '..')")


def decode_toc(compressed: bytes, uncompressed_length: int | None = None) -> bytes:
    """The TOC's JSON from its compressed bytes, refusing more than MAX_TOC_BYTES decoded."""
    MAX_TOC_COMPRESSED_BYTES.check(len(compressed), "the compressed zstd:chunked TOC")
    cap = MAX_TOC_BYTES.value
    if uncompressed_length is not None:
        MAX_TOC_BYTES.check(uncompressed_length, "the zstd:chunked TOC (as its annotation says)")
    try:
        out = decode_zstd_frames(compressed, cap)
    except FormatError as e:
        raise FormatError(f"zstd:chunked TOC {e}") from None
    MAX_TOC_BYTES.check(len(out), "the decoded zstd:chunked TOC")
    if uncompressed_length is not None and len(out) != uncompressed_length:
        raise FormatError(f"zstd:chunked TOC decodes to {len(out)} bytes, its annotation says "
                          f"{uncompressed_length}")
    return out


class ZstdChunkedToc(ChunkedIndex[ChunkedEntry, _Chunk]):
    """Parse with `ZstdChunkedToc.parse(compressed TOC bytes)`; see the module docstring."""

    def __init__(self, entries: list[ChunkedEntry], chunks: list[_Chunk], digest: str,
                 compressed_size: int) -> None:
        super().__init__(digest, entries, chunks, "the zstd:chunked TOC")
        self._names = [e.name.encode("utf-8", "surrogateescape") for e in entries]
        self.compressed_size = compressed_size

    @classmethod
    def parse(cls, compressed: bytes, digest: str | None = None, data_end: int | None = None,
              uncompressed_length: int | None = None) -> "ZstdChunkedToc":
        """Decode and check a compressed TOC. `digest` is its sha256 if the caller checked it;
        `data_end` where the blob's file frames must end (the TOC's own frame), when known."""
        digest = digest or "sha256:" + hashlib.sha256(compressed).hexdigest()
        raw = decode_toc(compressed, uncompressed_length)
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise FormatError(f"zstd:chunked TOC is not JSON: {str(e)[:200]}") from None
        if not isinstance(doc, dict):
            raise FormatError("zstd:chunked TOC is not a JSON object")
        version = doc.get("version")
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            raise FormatError(f"zstd:chunked TOC version {str(version)[:32]!r} is not supported (want 1)")
        items = doc.get("entries")
        if not isinstance(items, list):
            raise FormatError("zstd:chunked TOC has no entry list")
        limits.MAX_ENTRIES.check(len(items), "the zstd:chunked TOC's entry count")
        entries, chunks = _Parser(data_end).run(items)
        return cls(entries, chunks, digest, len(compressed))

    # -- the contract (fs/layer_index.py; the rest: chunked_index.py) ------------------------

    def entry_name(self, i: int) -> bytes:
        return self._names[i]

    def tree_entries(self) -> Iterator[tuple[bytes, str, bytes]]:
        for name, e in zip(self._names, self._entries):
            link = e.linkname.encode("utf-8", "surrogateescape") if e.type == "hardlink" else b""
            yield name, e.type, link

    def span_digest(self, i: int) -> str:
        """The digest of span i's *decoded* bytes (zstd:chunked digests cover content)."""
        return self._span(i).digest

    def decompress_span(self, i: int, compressed: bytes) -> bytes:
        """Span i's content, decoded from its frames and checked against its digest: IntegrityError
        for bytes that do not decode to exactly that (they are not the ones the TOC describes)."""
        self.verify_span(i, compressed)
        c = self._span(i)
        size = c.uend - c.ustart
        try:
            data = decode_zstd_frames(bytes(compressed), size)
        except FormatError as e:
            raise IntegrityError(f"chunk {i} {e}") from None
        if len(data) != size:
            raise IntegrityError(f"chunk {i} decodes to {len(data)} bytes or more, the TOC says {size}")
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != c.digest:
            raise IntegrityError(f"chunk {i} digest mismatch: expected {c.digest}, got {actual}",
                                 expected=c.digest, actual=actual)
        return data

    def __repr__(self) -> str:
        return f"<ZstdChunkedToc {len(self)} entries, {self.num_spans} chunks, {self.uncompressed_size} bytes>"


class _Parser:
    """One pass over the TOC's entries: attributes checked, chunks gathered per file."""

    def __init__(self, data_end: int | None) -> None:
        self.data_end = data_end
        self.entries: list[ChunkedEntry] = []
        self.chunks: list[_Chunk] = []
        self.pos = 0                 # the stream of file contents so far
        self.blob_pos = 0            # where the last frame ended in the blob
        self.times: dict[str, int] = {}

    def run(self, items: list[Any]) -> tuple[list[ChunkedEntry], list[_Chunk]]:
        k = 0
        while k < len(items):
            item = items[k]
            if not isinstance(item, dict):
                raise FormatError(f"zstd:chunked TOC entry {k} is not an object")
            typ = item.get("type")
            if not isinstance(typ, str):
                raise FormatError(f"zstd:chunked TOC entry {k} has no type")
            if typ == "chunk":
                raise FormatError(f"zstd:chunked TOC entry {k} is a chunk without its file before it")
            if typ not in ENTRY_TYPES:
                raise FormatError(f"zstd:chunked TOC entry {k} has type {str(typ)[:32]!r} "
                                  f"(want one of {', '.join(sorted(ENTRY_TYPES))})")
            end = k + 1
            while end < len(items) and isinstance(items[end], dict) and items[end].get("type") == "chunk":
                end += 1
            self._entry(k, item, items[k + 1:end])
            k = end
        return self.entries, self.chunks

    def _mtime(self, item: dict[str, Any], what: str) -> int:
        text = item.get("modtime")
        if text is None:
            return 0
        text = _text(text, f"{what} modtime")
        ns = self.times.get(text)
        if ns is None:
            ns = parse_rfc3339_nano(text)
            if len(self.times) < 4096:
                self.times[text] = ns
        return ns

    def _xattrs(self, item: dict[str, Any], what: str) -> dict[str, bytes]:
        raw = item.get("xattrs")
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise FormatError(f"{what} xattrs are not an object")
        out: dict[str, bytes] = {}
        for key, value in raw.items():
            limits.MAX_XATTR_NAME_BYTES.check(len(_bytes(key, f"{what} xattr name")), f"{what} xattr name")
            try:
                out[key] = base64.b64decode(_text(value, f"{what} xattr {key[:64]!r}"), validate=True)
            except binascii.Error:
                raise FormatError(f"{what} xattr {key[:64]!r} is not base64") from None
            limits.MAX_XATTR_VALUE_BYTES.check(len(out[key]), f"{what} xattr {key[:64]!r}")
        return out

    def _entry(self, k: int, item: dict[str, Any], more: list[dict[str, Any]]) -> None:
        what = f"zstd:chunked TOC entry {k}"
        typ = item["type"]
        name = _text(item.get("name"), f"{what} name")
        _safe_name(name, f"{what} name")
        what = f"zstd:chunked TOC entry {name[:128]!r}"
        linkname = _text(item.get("linkName", ""), f"{what} link target")
        limits.check_name(_bytes(linkname, f"{what} link target"), f"{what} link target", link=True)
        if typ == "hardlink":
            _safe_name(linkname, f"{what} hardlink target")
        size = _int(item.get("size"), f"{what} size")
        if typ != "reg" and (size or more):
            raise FormatError(f"{what} is a {typ} with content")
        digest = ""
        if typ == "reg" and size:
            digest = _sha256(item.get("digest"), f"{what} digest")
            self._chunks(what, item, more, size, digest)
        elif more:
            raise FormatError(f"{what} has chunks but no content")
        self.entries.append(ChunkedEntry(
            name=name, type=typ, offset=self.pos - size, size=size, linkname=linkname,
            mode=_int(item.get("mode"), f"{what} mode", high=0o7777777),
            uid=_int(item.get("uid"), f"{what} uid", high=(1 << 32) - 1),
            gid=_int(item.get("gid"), f"{what} gid", high=(1 << 32) - 1),
            mtime_ns=self._mtime(item, what),
            devmajor=_int(item.get("devMajor"), f"{what} device major", high=(1 << 32) - 1),
            devminor=_int(item.get("devMinor"), f"{what} device minor", high=(1 << 32) - 1),
            xattrs=self._xattrs(item, what), digest=digest))

    def _chunks(self, what: str, item: dict[str, Any], more: list[dict[str, Any]], size: int,
                file_digest: str) -> None:
        """The chunks of one file: contiguous in its content, frames forward in the blob."""
        parts = [item] + more
        start = _int(item.get("offset"), f"{what} offset")
        end = _int(item.get("endOffset"), f"{what} end offset")
        pieces = []            # (compressed start, content offset, content size, digest or "")
        for n, part in enumerate(parts):
            cstart = _int(part.get("offset"), f"{what} chunk {n} offset")
            coff = _int(part.get("chunkOffset"), f"{what} chunk {n} content offset")
            csize = _int(part.get("chunkSize"), f"{what} chunk {n} size")
            if part.get("chunkType", "") not in ("", "data", "zeros"):    # zeros: a frame of zeros, as data
                raise FormatError(f"{what} chunk {n} has type {str(part.get('chunkType'))[:32]!r}, "
                                  "which lazyoci does not serve")
            if len(parts) == 1 and not csize:
                csize = size
            cdigest = _sha256(part["chunkDigest"], f"{what} chunk {n} digest") if part.get("chunkDigest") else ""
            if part is not item and part.get("name") != item.get("name"):
                raise FormatError(f"{what} chunk {n} names another file")
            pieces.append((cstart, coff, csize, cdigest))
        expected = 0
        for n, (cstart, coff, csize, _) in enumerate(pieces):
            if coff != expected or csize <= 0:
                raise FormatError(f"{what} chunk {n} covers [{coff}, {coff + csize}) of the file, "
                                  f"want it to start at {expected}")
            expected = coff + csize
        if expected != size:
            raise FormatError(f"{what}: its chunks cover {expected} bytes of {size}")
        ends = [p[0] for p in pieces[1:]] + [end]
        if len(pieces) > 1 and not all(p[3] for p in pieces):     # check the file whole
            pieces, ends = [(start, 0, size, file_digest)], [end]
        elif len(pieces) == 1 and not pieces[0][3]:
            pieces = [(pieces[0][0], 0, size, file_digest)]
        for n, ((cstart, coff, csize, cdigest), cend) in enumerate(zip(pieces, ends)):
            if cstart < self.blob_pos or cend <= cstart:
                raise FormatError(f"{what} chunk {n} at [{cstart}, {cend}) of the blob overlaps the "
                                  f"frames before it (they end at {self.blob_pos}) or is empty")
            if self.data_end is not None and cend > self.data_end:
                raise FormatError(f"{what} chunk {n} at [{cstart}, {cend}) runs past the file frames "
                                  f"of the blob (they end at {self.data_end})")
            limits.MAX_SPAN_BYTES.check(max(csize, cend - cstart), f"{what} chunk {n}")
            self.chunks.append(_Chunk(cstart, cend, self.pos + coff, self.pos + coff + csize, cdigest))
            self.blob_pos = cend
        MAX_CHUNKS.check(len(self.chunks), "the zstd:chunked TOC's chunk count")
        self.pos += size

