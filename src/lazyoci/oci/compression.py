"""How a layer or tarball is compressed, decided in one place, and the reader that undoes it.

A pulled layer says its compression in its media type (`mediatypes.layer_compression`);
a layer in an archive or a tarball to import says it in its first bytes
(`sniff_compression`). Either way `open_decompressed` gives the uncompressed bytes:
ISA-L for gzip, zstd across frames, both across concatenated members (pigz, zstd -T).
"""

from __future__ import annotations

from typing import BinaryIO, cast

from lazyoci.errors import FormatError

_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
)
SNIFF_BYTES = 6     # enough of a stream's start for `sniff_compression`


def sniff_compression(head: bytes) -> str:
    """"gzip", "zstd", "xz", "bzip2" or "none", from the first SNIFF_BYTES of a stream."""
    return next((name for magic, name in _MAGIC if head.startswith(magic)), "none")


def open_decompressed(raw: BinaryIO, compression: str) -> BinaryIO:
    """A reader of `raw`'s uncompressed bytes; FormatError for a compression we cannot undo."""
    if compression == "none":
        return raw
    if compression == "gzip":
        from isal import igzip

        return igzip.IGzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
    if compression == "xz":
        import lzma

        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    if compression == "bzip2":
        import bz2

        return bz2.BZ2File(raw)  # type: ignore[return-value]
    raise FormatError(f"unsupported layer compression {compression!r}")


def inflate_gzip_member(data: bytes, limit: int, *, raw: bool = False) -> tuple[bytes, bytes | None]:
    """The first gzip member of `data` inflated, at most `limit` bytes of it, and the bytes after the
    member (None when it did not end within `limit`): lazy formats that cut a layer into gzip members
    (eStargz) decode one member at a time. `raw`: a bare deflate stream, its 8-byte trailer left after.
    FormatError for bytes that do not inflate."""
    import zlib

    d = zlib.decompressobj(-zlib.MAX_WBITS if raw else 31)
    try:
        out = d.decompress(data, limit)
    except zlib.error as e:
        raise FormatError(f"does not inflate: {e}") from None
    return out, (d.unused_data if d.eof else None)


def decode_zstd_frames(data: bytes, limit: int) -> bytes:
    """The decoded bytes of every zstd frame in `data` (skippable frames skipped), at most limit + 1
    of them (one more than allowed says there are too many), read 1 MiB at a time: lazy formats that
    cut a layer into zstd frames (zstd:chunked) decode a few at a time. FormatError if they do not decode."""
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    out = bytearray()
    try:
        while len(out) <= limit:
            more = reader.read(min(1 << 20, limit + 1 - len(out)))
            if not more:
                break
            out += more
    except zstandard.ZstdError as e:
        raise FormatError(f"does not decode: {e}") from None
    return bytes(out)


def decode_errors() -> tuple[type[BaseException], ...]:
    """What the readers of `open_decompressed` raise on a broken stream (each library its own)."""
    import gzip
    import lzma
    import zlib

    import zstandard
    from isal import isal_zlib

    isal_error = cast("type[BaseException]", isal_zlib.error)     # isal's stub calls the class an instance
    return (EOFError, ValueError, gzip.BadGzipFile, zlib.error, isal_error, lzma.LZMAError, zstandard.ZstdError)
